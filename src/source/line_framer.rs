//! Splits a noisy serial byte stream into lines, in memory bounded by `max_line`.
//!
//! Lines end with `\n`; one trailing `\r` is stripped. Empty lines are skipped silently. A line
//! longer than `max_line` bytes (not counting its terminator) is dropped and reported once as
//! [`FrameError::Overlong`], as soon as it passes the limit, and the rest of it is dropped
//! unbuffered up to the next `\n`. The first line after [`LineFramer::new`] or
//! [`LineFramer::reset`] is dropped as [`FrameError::PartialAtStart`] unless the caller knows the
//! stream starts on a line boundary: a port opened mid-line would otherwise hand the parser a
//! truncated line that may still parse, with wrong values.

/// A line limit that fits every sensor line we know of, with room to spare.
pub const DEFAULT_MAX_LINE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("line longer than the limit, dropped")]
    Overlong,
    #[error("partial line at the start of the stream, dropped")]
    PartialAtStart,
}

impl FrameError {
    pub fn reason(self) -> &'static str {
        match self {
            FrameError::Overlong => "overlong",
            FrameError::PartialAtStart => "partial_at_start",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a line that began on a boundary.
    Synced,
    /// Dropping the line in progress at start; `seen` once it has had a byte other than `\r`.
    Unsynced { seen: bool },
    /// Dropping the rest of an overlong line that has already been reported.
    Discarding,
}

#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// The last push ended with `\r`, kept out of `buf`: it is the terminator if `\n` comes
    /// next, so a line of exactly `max_line` bytes plus `\r\n` fits.
    pending_cr: bool,
    max_line: usize,
    state: State,
}

impl Default for LineFramer {
    /// [`DEFAULT_MAX_LINE`], not known to start on a line boundary.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE, false)
    }
}

impl LineFramer {
    /// `max_line` bytes are allocated once, here; the buffer never grows past them.
    /// `start_synced`: the first byte pushed is known to start a line.
    pub fn new(max_line: usize, start_synced: bool) -> Self {
        Self {
            buf: Vec::with_capacity(max_line),
            pending_cr: false,
            max_line,
            state: initial_state(start_synced),
        }
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Bytes held for the unfinished line; never more than `max_line`.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forgets the unfinished line, e.g. when the device was reopened. Its loss is not reported:
    /// the reopen is the event worth counting.
    pub fn reset(&mut self, start_synced: bool) {
        self.buf.clear();
        self.pending_cr = false;
        self.state = initial_state(start_synced);
    }

    /// Feeds bytes as they were read; `out` gets each complete line (without terminator) or
    /// the reason one was dropped. A line handed to `out` is only valid during the call.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut impl FnMut(Result<&[u8], FrameError>)) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.end_line(&bytes[..nl], out);
            bytes = &bytes[nl + 1..];
        }
        if !bytes.is_empty() {
            self.continue_line(bytes, out);
        }
    }

    /// `seg` is the last piece of the current line, up to (not including) its `\n`.
    fn end_line(&mut self, seg: &[u8], out: &mut impl FnMut(Result<&[u8], FrameError>)) {
        match self.state {
            State::Unsynced { seen } => {
                if seen || has_content(seg) {
                    out(Err(FrameError::PartialAtStart));
                }
            }
            State::Discarding => {}
            State::Synced => {
                let tail = seg.strip_suffix(b"\r").unwrap_or(seg);
                // A `\r` held back from the last push is part of the line if anything follows it.
                let cr = self.pending_cr && !seg.is_empty();
                let len = self.buf.len() + usize::from(cr) + tail.len();
                if len > self.max_line {
                    out(Err(FrameError::Overlong));
                } else if self.buf.is_empty() && !cr {
                    if !tail.is_empty() {
                        out(Ok(tail));
                    }
                } else {
                    if cr {
                        self.buf.push(b'\r');
                    }
                    self.buf.extend_from_slice(tail);
                    out(Ok(&self.buf));
                }
            }
        }
        self.buf.clear();
        self.pending_cr = false;
        self.state = State::Synced;
    }

    /// `bytes` holds no `\n`: the line goes on.
    fn continue_line(&mut self, bytes: &[u8], out: &mut impl FnMut(Result<&[u8], FrameError>)) {
        match self.state {
            State::Unsynced { seen } => {
                self.state = State::Unsynced {
                    seen: seen || has_content(bytes),
                };
            }
            State::Discarding => {}
            State::Synced => {
                let (body, ends_cr) = match bytes.strip_suffix(b"\r") {
                    Some(body) => (body, true),
                    None => (bytes, false),
                };
                let len = self.buf.len() + usize::from(self.pending_cr) + body.len();
                if len > self.max_line {
                    out(Err(FrameError::Overlong));
                    self.buf.clear();
                    self.pending_cr = false;
                    self.state = State::Discarding;
                    return;
                }
                if self.pending_cr {
                    self.buf.push(b'\r');
                }
                self.buf.extend_from_slice(body);
                self.pending_cr = ends_cr;
            }
        }
    }
}

fn initial_state(start_synced: bool) -> State {
    if start_synced {
        State::Synced
    } else {
        State::Unsynced { seen: false }
    }
}

/// A piece of line made only of `\r` counts as empty, like an empty line.
fn has_content(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b != b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frame = Result<Vec<u8>, FrameError>;

    fn frames(framer: &mut LineFramer, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut got = Vec::new();
        for chunk in chunks {
            framer.push(chunk, &mut |f| got.push(f.map(<[u8]>::to_vec)));
            assert!(framer.buffered() <= framer.max_line());
        }
        got
    }

    fn bytewise(framer: &mut LineFramer, stream: &[u8]) -> Vec<Frame> {
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        frames(framer, &chunks)
    }

    fn ok(line: &str) -> Frame {
        Ok(line.as_bytes().to_vec())
    }

    #[test]
    fn splits_lines_strips_cr_and_skips_empty_lines() {
        let mut f = LineFramer::new(64, true);
        let got = frames(&mut f, &[b"a=1\r\nb=2\n\n\r\nc=3", b"\r", b"\n"]);
        assert_eq!(got, vec![ok("a=1"), ok("b=2"), ok("c=3")]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn one_byte_chunks_give_the_same_lines() {
        let stream = b"a=1\r\nb=2\n\n\r\nx\ry\r\r\nlast\n";
        let whole = frames(&mut LineFramer::new(64, true), &[stream]);
        let split = bytewise(&mut LineFramer::new(64, true), stream);
        assert_eq!(whole, split);
        assert_eq!(whole, vec![ok("a=1"), ok("b=2"), ok("x\ry\r"), ok("last")]);
    }

    #[test]
    fn unfinished_line_is_held_until_its_newline() {
        let mut f = LineFramer::new(64, true);
        assert!(frames(&mut f, &[b"a=1"]).is_empty());
        assert_eq!(f.buffered(), 3);
        assert_eq!(frames(&mut f, &[b"2\n"]), vec![ok("a=12")]);
    }

    #[test]
    fn first_line_is_dropped_when_not_known_to_be_synced() {
        let mut f = LineFramer::default();
        let got = frames(&mut f, &[b"7850\na=1\n"]);
        assert_eq!(got, vec![Err(FrameError::PartialAtStart), ok("a=1")]);

        let got = bytewise(&mut LineFramer::default(), b"850\r\na=1\n");
        assert_eq!(got, vec![Err(FrameError::PartialAtStart), ok("a=1")]);
    }

    #[test]
    fn empty_partial_at_start_is_not_reported() {
        for stream in [&b"\na=1\n"[..], b"\r\na=1\n"] {
            let got = frames(&mut LineFramer::default(), &[stream]);
            assert_eq!(got, vec![ok("a=1")]);
        }
    }

    #[test]
    fn reset_drops_the_unfinished_line_and_resyncs_as_told() {
        let mut f = LineFramer::new(64, true);
        assert!(frames(&mut f, &[b"a=1 b="]).is_empty());
        f.reset(false);
        assert_eq!(f.buffered(), 0);
        let got = frames(&mut f, &[b"=2\nc=3\n"]);
        assert_eq!(got, vec![Err(FrameError::PartialAtStart), ok("c=3")]);

        assert!(frames(&mut f, &[b"a=1 b="]).is_empty());
        f.reset(true);
        assert_eq!(frames(&mut f, &[b"c=3\n"]), vec![ok("c=3")]);
    }

    #[test]
    fn overlong_line_is_reported_once_and_the_next_line_kept() {
        let mut long = vec![b'x'; 100];
        long.extend_from_slice(b"\nok\n");
        let whole = frames(&mut LineFramer::new(16, true), &[&long]);
        assert_eq!(whole, vec![Err(FrameError::Overlong), ok("ok")]);
        let split = bytewise(&mut LineFramer::new(16, true), &long);
        assert_eq!(split, whole);
    }

    #[test]
    fn endless_garbage_is_reported_once_in_bounded_memory() {
        let mut f = LineFramer::new(16, true);
        let capacity = f.buf.capacity();
        let mut reports = 0;
        for _ in 0..10_000 {
            f.push(b"noise without end ", &mut |r| {
                assert_eq!(r, Err(FrameError::Overlong));
                reports += 1;
            });
            assert!(f.buffered() <= 16);
        }
        assert_eq!(reports, 1);
        assert_eq!(f.buf.capacity(), capacity);
        assert_eq!(frames(&mut f, &[b"\nok\n"]), vec![ok("ok")]);
    }

    #[test]
    fn line_of_exactly_max_line_fits_with_either_terminator() {
        let stream = b"12345678\n12345678\r\n123456789\nok\r\n";
        let expected = vec![
            ok("12345678"),
            ok("12345678"),
            Err(FrameError::Overlong),
            ok("ok"),
        ];
        assert_eq!(frames(&mut LineFramer::new(8, true), &[stream]), expected);
        assert_eq!(bytewise(&mut LineFramer::new(8, true), stream), expected);
    }

    #[test]
    fn interior_cr_counts_towards_the_limit() {
        let stream = b"1234567\r8\nok\n";
        let expected = vec![Err(FrameError::Overlong), ok("ok")];
        assert_eq!(bytewise(&mut LineFramer::new(8, true), stream), expected);
        assert_eq!(frames(&mut LineFramer::new(8, true), &[stream]), expected);
    }

    #[test]
    fn reasons_are_stable() {
        assert_eq!(FrameError::Overlong.reason(), "overlong");
        assert_eq!(FrameError::PartialAtStart.reason(), "partial_at_start");
    }
}

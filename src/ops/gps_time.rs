//! GPS time from the CAN bus: a clock source for the garage, where there is no NTP.
//!
//! A GNSS receiver on the bus sends the UTC time of its fix, either as seconds since 1970
//! or as a date/time set (year, month, day, hour, minute, second). `GpsAssembler` turns the
//! decoded signals into samples: the UTC instant the receiver reported, next to the
//! instant the frame arrived on the sampling clock. `GpsJudge` decides when those samples
//! can be believed: at least `MIN_SAMPLES`, spread over `MIN_SPAN`, whose offsets
//! (UTC − arrival) agree within `AGREEMENT`. The offset it reports is the largest of the
//! agreeing ones: every sample arrives late by the bus and the receiver's latency, and a
//! receiver that sends whole seconds reports a time up to 1 s old, so the largest offset is
//! the sample closest to the truth.
//!
//! A receiver without a fix sends zeros, its epoch (1980 or 1970) or a time that jumps:
//! samples before the build time are refused, and a fix flag (`clock.gps_valid`), when
//! bound, must be non-zero.

use crate::sample::signal::Micros;
use std::collections::VecDeque;

/// Agreeing samples needed before GPS time is believed.
pub const MIN_SAMPLES: usize = 3;
/// The agreeing samples must span at least this much of the sampling clock.
pub const MIN_SPAN: Micros = 2_000_000;
/// Offsets within this of each other agree (a receiver sending whole seconds varies by 1 s).
pub const AGREEMENT: Micros = 1_500_000;
/// Samples older than this (on the sampling clock) are forgotten.
pub const WINDOW: Micros = 10_000_000;

/// Which part of the GPS time a decoded signal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// UTC seconds since 1970-01-01 (fractions allowed).
    UtcSeconds,
    Year,
    Month,
    Day,
    Hour,
    Minute,
    /// Second of the minute (fractions allowed): completes a date/time sample.
    Second,
    /// The fix flag: non-zero while the fix is valid.
    Valid,
}

impl Part {
    /// The parts of a date/time set, in the order of `[clock.gps]`'s keys.
    pub const DATE_TIME: [(&'static str, Part); 6] = [
        ("year", Part::Year),
        ("month", Part::Month),
        ("day", Part::Day),
        ("hour", Part::Hour),
        ("minute", Part::Minute),
        ("second", Part::Second),
    ];

    fn slot(self) -> usize {
        match self {
            Part::UtcSeconds => 0,
            Part::Year => 1,
            Part::Month => 2,
            Part::Day => 3,
            Part::Hour => 4,
            Part::Minute => 5,
            Part::Second => 6,
            Part::Valid => 7,
        }
    }
}

/// One GPS time: what the receiver said (`utc`) and when we heard it (`at`, sampling clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpsSample {
    pub utc: Micros,
    pub at: Micros,
}

/// Collects the decoded parts of the GPS time into samples.
#[derive(Debug, Clone)]
pub struct GpsAssembler {
    latest: [Option<f64>; 8],
    has_valid: bool,
}

impl GpsAssembler {
    /// `has_valid`: a fix flag is bound, and samples count only while it is non-zero.
    pub fn new(has_valid: bool) -> Self {
        Self {
            latest: [None; 8],
            has_valid,
        }
    }

    /// Takes a decoded part; returns a sample when this part completes one (the UTC
    /// seconds, or the second of a date/time set with every other part known).
    pub fn offer(&mut self, part: Part, value: f64, at: Micros) -> Option<GpsSample> {
        self.latest[part.slot()] = Some(value);
        if self.has_valid && self.latest[Part::Valid.slot()].is_none_or(|v| v == 0.0) {
            return None;
        }
        let utc = match part {
            Part::UtcSeconds => seconds_to_us(value)?,
            Part::Second => self.date_time_us()?,
            _ => return None,
        };
        Some(GpsSample { utc, at })
    }

    fn date_time_us(&self) -> Option<Micros> {
        let get = |p: Part| self.latest[p.slot()];
        let int = |p: Part| get(p).filter(|v| v.is_finite() && v.fract() == 0.0 && v.abs() < 1e6);
        let second = get(Part::Second).filter(|s| s.is_finite() && (0.0..61.0).contains(s))?;
        let month = time::Month::try_from(int(Part::Month)? as u8).ok()?;
        let date =
            time::Date::from_calendar_date(int(Part::Year)? as i32, month, int(Part::Day)? as u8)
                .ok()?;
        let hms = time::Time::from_hms(int(Part::Hour)? as u8, int(Part::Minute)? as u8, 0).ok()?;
        let midnight_minute = date.with_time(hms).assume_utc().unix_timestamp();
        Some(midnight_minute * 1_000_000 + (second * 1e6).round() as Micros)
    }
}

fn seconds_to_us(s: f64) -> Option<Micros> {
    // Far beyond any plausible time (year 2100 is 4.1e9 s), and the cast stays exact enough.
    (s.is_finite() && (0.0..1e11).contains(&s)).then(|| (s * 1e6).round() as Micros)
}

/// Decides when GPS samples can be believed, and the offset they give.
#[derive(Debug, Clone)]
pub struct GpsJudge {
    /// Samples before this UTC instant are refused (the build time).
    floor_us: Micros,
    /// (arrival, offset = utc − arrival), oldest first.
    samples: VecDeque<(Micros, Micros)>,
    /// Samples refused as before the floor or as going backwards.
    pub refused: u64,
}

impl GpsJudge {
    pub fn new(floor_us: Micros) -> Self {
        Self {
            floor_us,
            samples: VecDeque::with_capacity(128),
            refused: 0,
        }
    }

    pub fn offer(&mut self, s: GpsSample) {
        if s.utc < self.floor_us {
            self.refused += 1;
            return;
        }
        if self.samples.back().is_some_and(|&(at, _)| s.at < at) {
            // The sampling clock never runs back: this is a new run of a replay; start over.
            self.samples.clear();
        }
        self.samples.push_back((s.at, s.utc - s.at));
        while self
            .samples
            .front()
            .is_some_and(|&(at, _)| s.at - at > WINDOW)
        {
            self.samples.pop_front();
        }
        // At most a few hundred a second on any bus; bound it all the same.
        if self.samples.len() > 4096 {
            self.samples.pop_front();
        }
    }

    /// The offset to add to the sampling clock to get UTC, once the latest sample and
    /// enough before it agree; `None` until then.
    pub fn offset(&self) -> Option<Micros> {
        let &(last_at, last_off) = self.samples.back()?;
        let agreeing = self
            .samples
            .iter()
            .filter(|&&(_, off)| (off - last_off).abs() <= AGREEMENT);
        let (mut n, mut first_at, mut best) = (0usize, last_at, Micros::MIN);
        for &(at, off) in agreeing {
            n += 1;
            first_at = first_at.min(at);
            best = best.max(off);
        }
        // A receiver that jumps back and forth agrees with itself every other sample: at
        // least three in four samples since the first agreeing one must agree.
        let total = self
            .samples
            .iter()
            .filter(|&&(at, _)| at >= first_at)
            .count();
        (n >= MIN_SAMPLES && last_at - first_at >= MIN_SPAN && n * 4 >= total * 3).then_some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Micros = 1_700_000_000_000_000;
    const UTC: Micros = 1_764_633_600_000_000; // 2025-12-02T00:00:00Z

    #[test]
    fn utc_seconds_make_samples_and_a_missing_fix_makes_none() {
        let mut a = GpsAssembler::new(false);
        let s = a.offer(Part::UtcSeconds, 1_764_633_600.25, 7);
        assert_eq!(
            s,
            Some(GpsSample {
                utc: UTC + 250_000,
                at: 7
            })
        );
        assert_eq!(a.offer(Part::UtcSeconds, f64::NAN, 8), None);
        assert_eq!(a.offer(Part::UtcSeconds, -1.0, 8), None);

        let mut a = GpsAssembler::new(true);
        assert_eq!(
            a.offer(Part::UtcSeconds, 1_764_633_600.0, 1),
            None,
            "no flag yet"
        );
        a.offer(Part::Valid, 0.0, 2);
        assert_eq!(
            a.offer(Part::UtcSeconds, 1_764_633_600.0, 3),
            None,
            "no fix"
        );
        a.offer(Part::Valid, 1.0, 4);
        assert!(a.offer(Part::UtcSeconds, 1_764_633_600.0, 5).is_some());
    }

    #[test]
    fn a_date_time_set_completes_on_the_second() {
        let mut a = GpsAssembler::new(false);
        assert_eq!(a.offer(Part::Second, 1.5, 1), None, "no date yet");
        for (part, v) in [
            (Part::Year, 2025.0),
            (Part::Month, 12.0),
            (Part::Day, 2.0),
            (Part::Hour, 0.0),
            (Part::Minute, 0.0),
        ] {
            assert_eq!(a.offer(part, v, 1), None);
        }
        let s = a.offer(Part::Second, 1.5, 9);
        assert_eq!(
            s,
            Some(GpsSample {
                utc: UTC + 1_500_000,
                at: 9
            })
        );
        a.offer(Part::Month, 13.0, 10);
        assert_eq!(a.offer(Part::Second, 2.0, 11), None, "month 13");
        a.offer(Part::Month, 2.0, 10);
        a.offer(Part::Day, 30.0, 10);
        assert_eq!(a.offer(Part::Second, 2.0, 11), None, "30 February");
    }

    /// A receiver sending whole seconds at 10 Hz, heard 20 ms late, on a boot clock.
    fn whole_seconds(judge: &mut GpsJudge, boot: Micros, truth: Micros, ticks: i64) {
        for i in 0..ticks {
            let at = boot + i * 100_000;
            let true_utc = truth + i * 100_000 - 20_000;
            let utc = true_utc.div_euclid(1_000_000) * 1_000_000;
            judge.offer(GpsSample { utc, at });
        }
    }

    #[test]
    fn believed_after_three_agreeing_samples_over_two_seconds() {
        let mut j = GpsJudge::new(FLOOR);
        let boot = 5_000_000;
        whole_seconds(&mut j, boot, UTC, 20);
        assert_eq!(j.offset(), None, "1.9 s of samples");
        whole_seconds(&mut j, boot, UTC, 21);
        let off = j.offset().expect("2 s of agreeing samples");
        let truth = UTC - boot;
        assert!(
            (truth - 120_000..=truth).contains(&off),
            "offset {off} vs truth {truth}: the best sample is at most one send late"
        );
    }

    #[test]
    fn no_fix_samples_and_a_jumping_receiver_are_not_believed() {
        let mut j = GpsJudge::new(FLOOR);
        for i in 0..50 {
            // 1980-01-06, the GPS epoch: what a receiver without a fix may send.
            j.offer(GpsSample {
                utc: 315_964_800_000_000,
                at: i * 100_000,
            });
        }
        assert_eq!(j.offset(), None);
        assert_eq!(j.refused, 50);
        let mut j = GpsJudge::new(FLOOR);
        for i in 0..50 {
            let jump = if i % 2 == 0 { 0 } else { 60_000_000 };
            j.offer(GpsSample {
                utc: UTC + jump + i * 100_000,
                at: i * 100_000,
            });
        }
        assert_eq!(j.offset(), None, "every other sample a minute off");
    }

    #[test]
    fn a_step_is_followed_once_the_new_time_agrees() {
        let mut j = GpsJudge::new(FLOOR);
        whole_seconds(&mut j, 0, UTC, 30);
        let before = j.offset().expect("believed");
        // The receiver's time steps by 10 s (a leap second table, a new fix).
        for i in 30..60 {
            j.offer(GpsSample {
                utc: UTC + 10_000_000 + i * 100_000,
                at: i * 100_000,
            });
        }
        let after = j.offset().expect("the new time agrees with itself");
        assert!(
            (after - before - 10_000_000).abs() <= 1_000_000,
            "{before} -> {after}"
        );
    }
}

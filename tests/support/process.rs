//! Child processes with captured output, deadlines and cleanup on Drop.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Buf = Arc<Mutex<Vec<u8>>>;

fn pump(mut from: impl Read + Send + 'static, into: Buf) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match from.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// A running child whose stdout and stderr are collected by background threads.
pub struct Proc {
    name: String,
    child: Child,
    stdout: Buf,
    stderr: Buf,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let stdout = Buf::default();
        let stderr = Buf::default();
        let readers = vec![
            pump(child.stdout.take().unwrap(), stdout.clone()),
            pump(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                self.join_readers();
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit; on timeout kills the child and panics with its stderr.
    pub fn wait_or_panic(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?} (killed)\n--- stderr ---\n{}\n--- stdout (tail) ---\n{}",
                    self.name,
                    self.stderr_text(),
                    tail(&self.stdout_text(), 4000)
                );
            }
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Complete (newline-terminated) stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        let text = self.stdout_text();
        let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
        // The last piece follows the last newline: empty or an incomplete line.
        lines.pop();
        lines
    }

    /// Sends SIGTERM and waits (up to 10 s, then SIGKILL).
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(s) = self.try_status() {
            self.join_readers();
            return s;
        }
        send_signal(self.pid(), "TERM");
        if let Some(s) = self.wait_timeout(Duration::from_secs(10)) {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("wait after kill");
        self.status = Some(s);
        self.join_readers();
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends a signal by name (`TERM`, `STOP`, ...) to one process id with kill(1).
pub fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill(1)");
    // kill fails only when the process is already gone, which callers check themselves.
    let _ = status;
}

/// The result of a process run to its end.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stdout_text: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stderr ---\n{}\n--- stdout (tail) ---\n{}",
            self.status,
            self.elapsed,
            tail(&self.stderr, 6000),
            tail(&self.stdout_text, 2000)
        )
    }
}

/// Runs `cmd` to its end; panics (after killing it) if it takes longer than `timeout`.
pub fn run(name: &str, cmd: Command, timeout: Duration) -> Finished {
    let started = Instant::now();
    let mut p = Proc::spawn(name, cmd);
    let status = p.wait_or_panic(timeout);
    Finished {
        status,
        stdout: p.stdout_bytes(),
        stdout_text: p.stdout_text(),
        stderr: p.stderr_text(),
        elapsed: started.elapsed(),
    }
}

/// The last `max` bytes of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

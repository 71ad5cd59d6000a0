//! Injected read errors on segment files, for the tests of the retry path (a flaky SD card
//! answering EIO). Compiled only for the unit tests and with the `test-hooks` feature: the
//! release binary has no such code. The plan is per thread (the thread that reads the spool
//! in a test), so tests running side by side do not see each other's faults.

use std::cell::RefCell;
use std::io;
use std::path::Path;

#[derive(Debug, Clone)]
struct ReadFault {
    /// The segment's file name (`00000000000000000000.seg`).
    file: String,
    /// A read whose range covers this byte fails.
    at: u64,
    /// How many more reads fail.
    times: u32,
}

thread_local! {
    static PLAN: RefCell<Vec<ReadFault>> = const { RefCell::new(Vec::new()) };
}

/// Faults planned for every thread, by the segment's full path (for reads on the spool's
/// own thread; a test's temporary directory keeps them apart from other tests).
static SHARED: std::sync::Mutex<Vec<ReadFault>> = std::sync::Mutex::new(Vec::new());

/// The next `times` reads of the file at `path` that cover byte `at` fail with EIO, on any
/// thread.
pub fn fail_reads_on_any_thread(path: &Path, at: u64, times: u32) {
    let mut plan = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    plan.push(ReadFault {
        file: path.to_string_lossy().into_owned(),
        at,
        times,
    });
}

/// Removes the faults planned for `path` on any thread.
pub fn clear_on_any_thread(path: &Path) {
    let name = path.to_string_lossy();
    let mut plan = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    plan.retain(|f| f.file != name);
}

/// The next `times` reads of `file` (a file name) that cover byte `at` fail with EIO.
pub fn fail_reads(file: &str, at: u64, times: u32) {
    PLAN.with(|p| {
        p.borrow_mut().push(ReadFault {
            file: file.to_owned(),
            at,
            times,
        })
    });
}

/// Removes every planned fault; returns how many failures were planned and never served.
pub fn clear() -> u64 {
    PLAN.with(|p| {
        let left = p.borrow().iter().map(|f| u64::from(f.times)).sum();
        p.borrow_mut().clear();
        left
    })
}

/// Called by the segment reader before every read of `len` bytes at `at` of `path`.
pub(crate) fn check(path: &Path, at: u64, len: usize) -> io::Result<()> {
    {
        let full = path.to_string_lossy();
        let mut plan = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        let hit = plan.iter_mut().find(|f| {
            f.times > 0 && f.file == full && f.at >= at && f.at < at.saturating_add(len as u64)
        });
        if let Some(f) = hit {
            f.times -= 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    PLAN.with(|p| {
        let mut plan = p.borrow_mut();
        let hit = plan.iter_mut().find(|f| {
            f.times > 0 && f.file == name && f.at >= at && f.at < at.saturating_add(len as u64)
        });
        match hit {
            Some(f) => {
                f.times -= 1;
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            None => Ok(()),
        }
    })
}

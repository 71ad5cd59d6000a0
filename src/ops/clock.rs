//! Time: the live sampling clock, and whether the wall clock can be trusted.
//!
//! Live sampling runs on `CLOCK_BOOTTIME` (it never steps) plus a fixed offset chosen at
//! start, so an NTP step cannot bend the 100 ms grid mid-run. When the wall clock is
//! trusted at start, the offset is wall − boot and readings carry UTC. When it is not (an
//! ECU without a battery-backed clock boots in 1970 or at its last shutdown), the offset is
//! zero: readings are stamped on the boot clock, kept in the spool, and converted to UTC
//! once the clock is trusted (see `TimeBase`).

use crate::sample::signal::Micros;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

pub fn wall_now_us() -> Micros {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as Micros,
        Err(e) => -(e.duration().as_micros() as Micros),
    }
}

/// Microseconds since boot, suspend included (`CLOCK_BOOTTIME`).
pub fn boot_now_us() -> Micros {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as Micros * 1_000_000 + ts.tv_nsec as Micros / 1_000
}

/// This boot's identity; readings stamped on the boot clock belong to it.
pub fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        let s = std::str::from_utf8(pair).unwrap_or("0");
        id[i] = u8::from_str_radix(s, 16).unwrap_or(0);
    }
    id
}

pub fn boot_id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sampling clock of live mode: the boot clock plus a fixed offset.
#[derive(Debug, Clone, Copy)]
pub struct LiveClock {
    anchor_us: Micros,
    anchor: Instant,
}

impl LiveClock {
    /// `offset`: added to the boot clock (wall − boot when trusted, else 0).
    pub fn start(offset: Micros) -> Self {
        Self {
            anchor_us: boot_now_us() + offset,
            anchor: Instant::now(),
        }
    }

    pub fn now(&self) -> Micros {
        self.anchor_us + self.anchor.elapsed().as_micros() as Micros
    }

    /// The monotonic instant at which this clock reads `t` (now, if `t` is past).
    pub fn instant_of(&self, t: Micros) -> Instant {
        let ahead = t - self.anchor_us;
        if ahead <= 0 {
            return self.anchor;
        }
        self.anchor + std::time::Duration::from_micros(ahead as u64)
    }
}

/// How timestamps of new readings relate to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBase {
    /// True once readings can carry UTC.
    pub trusted: bool,
    /// Added to the sampling clock to get UTC (valid when trusted).
    pub correction: Micros,
    pub boot_id: [u8; 16],
}

/// Where the verdict on the wall clock comes from.
#[derive(Debug, Clone)]
pub enum ClockSource {
    /// The kernel's NTP state (`adjtimex`) when `require_sync`, and a sanity floor.
    System {
        floor_us: Micros,
        require_sync: bool,
    },
    /// Tests: a file saying `trusted` or `untrusted` (the kernel state is not settable).
    /// Only in a build with the `test-hooks` feature, never in the binary on the car.
    #[cfg(feature = "test-hooks")]
    File(std::path::PathBuf),
}

/// The wall clock's verdict, with the reason when untrusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    Untrusted(&'static str),
}

/// The build time: a wall clock before it is wrong.
pub fn build_floor_us() -> Micros {
    env!("REDLINE_BUILD_UNIX").parse::<Micros>().unwrap_or(0) * 1_000_000
}

impl ClockSource {
    pub fn check(&self) -> Verdict {
        match self {
            #[cfg(feature = "test-hooks")]
            ClockSource::File(path) => match std::fs::read_to_string(path) {
                Ok(s) if s.trim() == "trusted" => Verdict::Trusted,
                _ => Verdict::Untrusted("the test clock file says untrusted"),
            },
            ClockSource::System {
                floor_us,
                require_sync,
            } => judge(wall_now_us(), *floor_us, *require_sync, kernel_synchronised),
        }
    }
}

/// The verdict on a wall clock that reads `wall_us`: untrusted before `floor_us` (the build
/// time), and, when `require_sync`, until a time service has synchronised it (`synced` is
/// asked only then).
pub fn judge(
    wall_us: Micros,
    floor_us: Micros,
    require_sync: bool,
    synced: impl FnOnce() -> bool,
) -> Verdict {
    if wall_us < floor_us {
        return Verdict::Untrusted("the wall clock is before the agent was built");
    }
    if require_sync && !synced() {
        return Verdict::Untrusted("the kernel clock is not synchronised (NTP, PTP or GPS)");
    }
    Verdict::Trusted
}

/// Whether a time service has synchronised the clock: the kernel's view (`adjtimex`
/// returns TIME_ERROR until NTP, PTP or GPS has set it), or, where the hardened unit
/// forbids even reading it (`ProtectClock=yes`), systemd-timesyncd's flag file.
pub fn kernel_synchronised() -> bool {
    // SAFETY: a zeroed timex with modes = 0 only reads the kernel state into it.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::adjtimex(&mut tx) };
    synchronised(rc, tx.status, || {
        std::path::Path::new(TIMESYNCD_FLAG).exists()
    })
}

/// The decision of `kernel_synchronised`: `rc` and `status` as `adjtimex` returned them
/// (`rc` < 0: the call was refused), `timesyncd_flag` asked only then.
pub fn synchronised(rc: i32, status: i32, timesyncd_flag: impl FnOnce() -> bool) -> bool {
    if rc >= 0 {
        return rc != libc::TIME_ERROR && (status & libc::STA_UNSYNC) == 0;
    }
    timesyncd_flag()
}

/// Created by systemd-timesyncd once it has synchronised the clock (in /run: gone at boot).
pub const TIMESYNCD_FLAG: &str = "/run/systemd/timesync/synchronized";

/// The sampling grid's period at `rate_hz`: offsets are rounded to it so converted
/// timestamps stay on the grid (a whole second when the rate does not divide one).
pub fn grid_step(rate_hz: u32) -> Micros {
    if 1_000_000 % i64::from(rate_hz) == 0 {
        1_000_000 / i64::from(rate_hz)
    } else {
        1_000_000
    }
}

/// Wall clock minus boot clock, now: added to a boot-clock stamp, it gives UTC.
pub fn boot_to_utc_us() -> Micros {
    wall_now_us() - boot_now_us()
}

/// An offset between clocks as timestamps use it (the boot→UTC offset, the sampling
/// clock's correction, an NTP step): rounded to the sampling grid, so timestamps converted
/// with it stay on the grid. The one place this rounding is decided.
pub fn offset_on_grid(offset: Micros, grid_step: Micros) -> Micros {
    round_to(offset, grid_step)
}

/// `x` rounded to the nearest multiple of `step`.
pub fn round_to(x: Micros, step: Micros) -> Micros {
    if step <= 1 {
        return x;
    }
    (x + step / 2).div_euclid(step) * step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_the_grid() {
        assert_eq!(round_to(1_049_999, 100_000), 1_000_000);
        assert_eq!(round_to(1_050_000, 100_000), 1_100_000);
        assert_eq!(round_to(-49_999, 100_000), 0);
        assert_eq!(round_to(-150_000, 100_000), -100_000);
    }

    const FLOOR: Micros = 1_700_000_000_000_000;

    #[test]
    fn the_judge_distrusts_a_clock_before_the_build() {
        let before = judge(FLOOR - 1, FLOOR, false, || {
            panic!("not asked under `floor`")
        });
        assert_eq!(
            before,
            Verdict::Untrusted("the wall clock is before the agent was built")
        );
        // 1970 (an ECU without a battery-backed clock): untrusted even when "synchronised".
        assert_eq!(judge(0, FLOOR, true, || true), before);
        assert_eq!(judge(-5, FLOOR, false, || true), before);
        assert_eq!(
            judge(FLOOR, FLOOR, false, || panic!("not asked")),
            Verdict::Trusted
        );
        assert_eq!(judge(FLOOR + 1, FLOOR, false, || false), Verdict::Trusted);
    }

    #[test]
    fn the_judge_under_synced_needs_a_time_service() {
        let unsynced = Verdict::Untrusted("the kernel clock is not synchronised (NTP, PTP or GPS)");
        assert_eq!(judge(FLOOR + 1, FLOOR, true, || false), unsynced);
        assert_eq!(judge(FLOOR + 1, FLOOR, true, || true), Verdict::Trusted);
    }

    #[test]
    fn kernel_state_decides_and_the_timesyncd_flag_only_when_adjtimex_is_refused() {
        let no_flag = || panic!("the flag is read only when adjtimex is refused");
        // The kernel's answer wins whatever timesyncd's flag says.
        assert!(synchronised(libc::TIME_OK, 0, no_flag));
        assert!(!synchronised(libc::TIME_ERROR, 0, no_flag));
        assert!(!synchronised(libc::TIME_OK, libc::STA_UNSYNC, no_flag));
        assert!(!synchronised(
            libc::TIME_INS,
            libc::STA_UNSYNC | libc::STA_PLL,
            no_flag
        ));
        assert!(synchronised(libc::TIME_INS, libc::STA_PLL, no_flag));
        // Refused (ProtectClock=yes: EPERM): systemd-timesyncd's flag file.
        assert!(synchronised(-1, 0, || true));
        assert!(!synchronised(-1, 0, || false));
    }

    #[test]
    fn the_build_floor_is_the_build_time() {
        let floor = build_floor_us();
        // Built after this code was written (2025) and not in the future.
        assert!(floor > 1_735_689_600_000_000, "floor {floor}");
        assert!(floor <= wall_now_us(), "floor {floor} is in the future");
        assert_eq!(floor % 1_000_000, 0);
    }

    #[test]
    fn boot_clock_and_id() {
        let a = boot_now_us();
        let b = boot_now_us();
        assert!(a > 0 && b >= a);
        assert_ne!(boot_id(), [0u8; 16], "boot id read from /proc");
        assert_eq!(boot_id_hex(&[0xab; 16]).len(), 32);
    }
}

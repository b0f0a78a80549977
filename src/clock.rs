//! The kernel's coarse clocks: the time of the last scheduler tick (a few milliseconds
//! old at most), read from the vDSO without the time-stamp counter — for the per-request
//! stamps that need no more than that (the `Date` header, idle connections' ages), so
//! the warm path reads the precise clock only where a duration is measured.
//!
//! Pure: no I/O; no state but the origin of a fallback no Linux system takes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, to the tick.
pub fn coarse_unix_seconds() -> u64 {
    match read(libc::CLOCK_REALTIME_COARSE) {
        Some(now) => now.as_secs(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    }
}

/// Time on the monotonic clock, to the tick: only ever compared with itself (its
/// origin is the system's boot, not an `Instant`'s).
pub fn coarse_monotonic() -> Duration {
    read(libc::CLOCK_MONOTONIC_COARSE).unwrap_or_else(|| {
        // Not reachable on Linux; a clock that still only moves forward.
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(std::time::Instant::now).elapsed()
    })
}

fn read(clock: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write into; the clock ids are constants.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(now.tv_sec).ok()?,
        u32::try_from(now.tv_nsec).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clocks_agree_with_the_precise_ones_to_a_tick() {
        let precise = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(coarse_unix_seconds().abs_diff(precise) <= 1);
        let before = coarse_monotonic();
        std::thread::sleep(Duration::from_millis(50));
        let waited = coarse_monotonic() - before;
        // Ticks are at most 10 ms apart (HZ ≥ 100): each reading lags by less than one.
        assert!(
            waited >= Duration::from_millis(35) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }
}

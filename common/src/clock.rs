//! The wall clock both binaries stamp frames and heartbeats with: Unix-epoch integers, the
//! units of the wire contract (`framelink-capture-ns`) and of heartbeats.
//!
//! A clock set before 1970 (an edge device without RTC before NTP can be far off, but not
//! before the epoch) reads 0 instead of failing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_units_agree() {
        let (ns, ms) = (super::now_ns(), super::now_ms());
        assert!(ms > 1_600_000_000_000, "after 2020: {ms}");
        assert!((ns / 1_000_000).abs_diff(ms) < 10_000, "{ns} ns vs {ms} ms");
    }
}

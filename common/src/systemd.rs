//! systemd service notifications for both daemons (`Type=notify`, `WatchdogSec=`).
//!
//! `ready()` once the daemon does its job, `stopping()` on shutdown, and a watchdog thread that
//! pings systemd only while the daemon's main loop proves it is alive by moving a heartbeat: a
//! hung loop (not a dead process, which systemd sees anyway) stops the pings and systemd
//! restarts the service. Outside systemd (`NOTIFY_SOCKET` unset) all of this does nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;
use crate::shutdown::Shutdown;

/// A main loop's proof of life (Unix ms of its last turn).
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicU64);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last beat (`u64::MAX`-ish before the first).
    pub fn age_ms(&self) -> u64 {
        now_ms().saturating_sub(self.0.load(Ordering::Relaxed))
    }
}

pub fn ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// When systemd asked for a watchdog, pings it every half period while `heartbeat` is younger
/// than the period, until `shutdown`. `what` names the loop in the error log.
pub fn spawn_watchdog(heartbeat: Arc<Heartbeat>, shutdown: Shutdown, what: &'static str) {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let _ = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let limit = interval.as_millis() as u64;
        while !shutdown.is_set() {
            if heartbeat.age_ms() < limit {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!(loop_name = what, "Main loop stalled: not feeding the systemd watchdog.");
            }
            shutdown.wait_timeout((interval / 2).max(Duration::from_millis(100)));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_ages() {
        let h = Heartbeat::default();
        assert!(h.age_ms() > 1_000_000, "never beaten");
        h.beat();
        assert!(h.age_ms() < 1_000);
    }
}

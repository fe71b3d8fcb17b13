//! The stop request both daemons share: set by SIGTERM / SIGINT (or by the daemon itself), read
//! by every loop, and waited on by every pause.
//!
//! A flag alone makes each pause (a camera's reopen backoff, the watchdog's ping period) a loop
//! of short sleeps that polls it, and a stop waits out the current slice. [`Shutdown::wait_timeout`]
//! sleeps on a condition variable instead, so a stop wakes every waiter at once.
//!
//! Signals reach it through a thread of signal-hook's iterator: a signal handler may only do
//! async-signal-safe work, and waking a condition variable is not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A stop request, cheap to clone: every clone sees the same request.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    flag: AtomicBool,
    lock: Mutex<()>,
    woken: Condvar,
}

impl Shutdown {
    /// A request that only [`trigger`](Self::trigger) sets (tests, benchmarks, tools).
    pub fn new() -> Self {
        Self::default()
    }

    /// A request that SIGTERM and SIGINT set as well. The handlers stay installed for the life
    /// of the process; a second signal changes nothing.
    pub fn on_signals() -> std::io::Result<Self> {
        let shutdown = Self::new();
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
        let s = shutdown.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            for signal in signals.forever() {
                tracing::debug!(signal, "Stop requested by signal.");
                s.trigger();
            }
        })?;
        Ok(shutdown)
    }

    /// Whether a stop was requested.
    pub fn is_set(&self) -> bool {
        self.0.flag.load(Ordering::Relaxed)
    }

    /// Requests the stop and wakes every [`wait_timeout`](Self::wait_timeout).
    pub fn trigger(&self) {
        // Set under the lock: a waiter checks the flag under it, so it either sees the flag or
        // is already waiting when the notification comes.
        let _guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.flag.store(true, Ordering::Relaxed);
        self.0.woken.notify_all();
    }

    /// Sleeps up to `d`. True as soon as a stop is requested (at once when it already is);
    /// false when `d` passed without one.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let deadline = Instant::now().checked_add(d);
        let mut guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.is_set() {
                return true;
            }
            let left = match deadline {
                Some(at) => at.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return false;
            }
            guard = self.0.woken.wait_timeout(guard, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The request as a plain flag, for code that only reads one (`load`). Setting it directly
    /// wakes no waiter: request a stop with [`trigger`](Self::trigger).
    pub fn flag(&self) -> &AtomicBool {
        &self.0.flag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_times_out_without_a_request() {
        let s = Shutdown::new();
        let started = Instant::now();
        assert!(!s.wait_timeout(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(!s.is_set() && !s.flag().load(Ordering::Relaxed));
    }

    #[test]
    fn wait_wakes_at_once_on_trigger() {
        let s = Shutdown::new();
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                (s.wait_timeout(Duration::from_secs(60)), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        let (stopped, waited) = waiter.join().unwrap();
        assert!(stopped);
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        assert!(s.is_set() && s.flag().load(Ordering::Relaxed));
    }

    #[test]
    fn wait_after_a_request_returns_at_once() {
        let s = Shutdown::new();
        s.trigger();
        s.trigger();
        let started = Instant::now();
        assert!(s.wait_timeout(Duration::from_secs(60)));
        assert!(s.wait_timeout(Duration::MAX));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

//! `Shutdown`: the stop signal the threads of a component share. Triggering it disconnects a
//! crossbeam channel, so a loop waiting on it (`sleep`, or `select!` on `channel` next to its
//! own channels) wakes at once instead of noticing a flag at its next poll. `Backoff`: the one
//! doubling retry delay of the loops that wait for a service to come back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

/// A stop signal: cloned into every thread of a component, triggered once by its owner.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// Never receives a message: it disconnects when the one sender is dropped.
    rx: Receiver<()>,
    tx: Arc<Mutex<Option<Sender<()>>>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Shutdown {
            rx,
            tx: Arc::new(Mutex::new(Some(tx))),
        }
    }

    /// Signals every holder (idempotent): waits end at once, `is_triggered` turns true.
    pub fn trigger(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    pub fn is_triggered(&self) -> bool {
        matches!(self.rx.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Waits `d`, or less when shutdown is triggered meanwhile; true when it was.
    pub fn sleep(&self, d: Duration) -> bool {
        matches!(self.rx.recv_timeout(d), Err(RecvTimeoutError::Disconnected))
    }

    /// The channel that disconnects on `trigger`, for a `select!` next to a loop's own
    /// channels (a receive from it only ever returns an error).
    pub fn channel(&self) -> &Receiver<()> {
        &self.rx
    }
}

/// A retry delay that doubles after each failure, from `first` up to `max`, and starts over
/// after a success (`reset`).
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay to wait before the next try; the one after it is twice as long (capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// A success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_triggered_shutdown_ends_every_wait_at_once() {
        let s = Shutdown::new();
        assert!(!s.is_triggered());
        assert!(!s.sleep(Duration::from_millis(10)));
        let other = s.clone();
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            (other.sleep(Duration::from_secs(30)), t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        s.trigger();
        let (stopped, took) = t.join().unwrap();
        assert!(stopped && took < Duration::from_secs(5), "{took:?}");
        assert!(s.is_triggered());
        let t0 = Instant::now();
        assert!(s.sleep(Duration::from_secs(30)));
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }
}

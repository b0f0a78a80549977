//! The owner loop's waiting helpers: optional futures as `select!` arms, and timers
//! that stay registered across events.

use std::future::Future;
use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// Awaits `future` if there is one; never resolves otherwise (a disabled `select!` arm).
pub(super) async fn maybe<F: Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// A timer that stays registered across the owner's events and moves only when its
/// deadline changes: a `Sleep` made anew for every event would be registered anew in
/// the runtime's timer wheel every time (a burst release is thousands of events).
pub(super) struct Timer {
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Timer {
    pub(super) fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
        }
    }

    /// Fires at `at`; never if `None`.
    pub(super) fn set(&mut self, at: Option<Instant>) {
        if at != self.armed {
            if let Some(at) = at {
                self.sleep.as_mut().reset(at);
            }
            self.armed = at;
        }
    }

    /// Resolves when the armed deadline passes (and disarms); never if disarmed.
    pub(super) async fn fired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        self.sleep.as_mut().await;
        self.armed = None;
    }
}

//! Keep-warm: a VM with a schedule (`Policy::keep_warm`) is started ahead of each window
//! — by its last cold start plus a margin — and is not scaled down by the idle timer
//! inside a window (nor in the lead before one); outside, the idle timeout applies.
//!
//! Several replicas each start the VM ahead of a window; the backend's start is the
//! same idempotent or compare-and-set call an event's start is, so the VM starts once.
//! A keep-warm start is a cold start like any other (`scale_ups_total`,
//! `cold_start_seconds`), which also keeps the lead estimate current.
//!
//! Owns: the warm timer's deadline. The windows are `vm::Schedule`'s; wall-clock time
//! comes from the context (a paused clock in tests).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Life, Owner, StartKind};
use crate::lifecycle::AdmitError;
use crate::vm::{Schedule, VmPhase};

/// How far ahead of a window a VM starts before any cold start was measured.
const FIRST_LEAD: Duration = Duration::from_secs(30);
/// Added to the last measured cold start.
const LEAD_MARGIN: Duration = Duration::from_secs(10);

impl Owner {
    /// The schedule in force — or about to be: a new schedule takes effect at once, not
    /// only at the next stop as other policy changes do.
    fn schedule(&self) -> Option<Arc<Schedule>> {
        match &self.pending_policy {
            Some(pending) => pending.keep_warm.clone(),
            None => self.policy().keep_warm.clone(),
        }
    }

    pub(super) fn wall_now(&self) -> SystemTime {
        (self.handle.0.context.wall_clock)()
    }

    /// The runtime instant of the wall-clock time `at`, past or future.
    pub(super) fn instant_at(&self, at: SystemTime) -> Instant {
        let now = Instant::now();
        match at.duration_since(self.wall_now()) {
            Ok(ahead) => now + ahead,
            Err(behind) => now.checked_sub(behind.duration()).unwrap_or(now),
        }
    }

    /// How long before a window the VM is started.
    fn lead(&self) -> Duration {
        self.tx.gate().last_cold_start().unwrap_or(FIRST_LEAD) + LEAD_MARGIN
    }

    /// Until when the schedule keeps the VM up, if it does now: inside a window, or in
    /// the lead before one.
    pub(super) fn kept_warm_until(&self) -> Option<Instant> {
        let schedule = self.schedule()?;
        let now = self.wall_now();
        // The window a keep-warm start was for counts too: the lead it was started with
        // may be longer than the one measured since.
        let started_for = self.warm_hold.filter(|end| *end > now);
        let until = schedule
            .inside(now)
            .max(schedule.inside(now + self.lead()))
            .max(started_for)?;
        Some(self.instant_at(until))
    }

    /// A pre-warm (admin `start`, a pre-warm event): the VM is started unless it is
    /// running or on its way, and its idle timeout counts from now.
    pub(super) fn warm(&mut self) -> Result<VmPhase, AdmitError> {
        if let Some(error) = &self.rejecting {
            return Err(error.clone());
        }
        self.tx.touch();
        if self.op.is_none() {
            if let Some(kind) = self.start_kind() {
                tracing::info!(vm = %self.handle.key(), "pre-warm: starting");
                self.start(kind);
            }
        }
        if matches!(self.life, Life::Running { .. }) {
            self.arm_idle_timer();
        }
        Ok(self.phase())
    }

    /// How a VM at rest starts; `None` while it runs or is on its way.
    pub(super) fn start_kind(&self) -> Option<StartKind> {
        match self.life {
            Life::Stopped | Life::Failed => Some(StartKind::Boot),
            Life::Paused => Some(StartKind::Resume),
            Life::Hibernated => Some(StartKind::Restore),
            _ => None,
        }
    }

    /// Starts the VM if the schedule wants it up now, and sets the warm timer to the next
    /// window's start minus the lead (none without a schedule).
    pub(super) fn keep_warm(&mut self) {
        let Some(schedule) = self.schedule() else {
            self.warm_at = None;
            return;
        };
        let now = self.wall_now();
        let window_end = schedule.inside(now).max(schedule.inside(now + self.lead()));
        if window_end.is_some() {
            self.warm_hold = self.warm_hold.max(window_end);
        }
        if window_end.is_some() && self.op.is_none() {
            if let Some(kind) = self.start_kind() {
                tracing::info!(vm = %self.handle.key(), %schedule, "keep-warm window: starting");
                self.start(kind);
            }
        }
        let lead = self.lead();
        let next = schedule.next_start(self.wall_now() + lead);
        self.warm_at = next.map(|start| self.instant_at(start - lead));
    }
}

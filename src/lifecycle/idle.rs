//! When an idle VM is scaled down, and how: pure functions the owner's idle timer uses.
//!
//! Owns: the scale-down plan (stop, pause, hibernate, and the two-tier plans) and the idle deadline,
//! which honours activity any replica recorded. Must not import anything with effects.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::vm::{ScaleDown, VmPhase};

/// What a scale-down does to the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Power the VM off.
    Stop,
    /// Suspend it in memory.
    Pause,
    /// Save it to disk and end it.
    Hibernate,
}

impl Action {
    /// The `action` label of `scale_downs_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Pause => "pause",
            Action::Hibernate => "hibernate",
        }
    }
}

/// What to do with a VM in `phase` under `scale_down`, and after how much idleness.
pub(super) fn plan(phase: VmPhase, scale_down: ScaleDown, idle_timeout: Duration) -> Option<(Action, Duration)> {
    match (phase, scale_down) {
        (VmPhase::Ready, ScaleDown::Stop) => Some((Action::Stop, idle_timeout)),
        (VmPhase::Ready, ScaleDown::Pause | ScaleDown::PauseThenStop | ScaleDown::PauseThenHibernate) => {
            Some((Action::Pause, idle_timeout))
        }
        (VmPhase::Ready, ScaleDown::Hibernate | ScaleDown::HibernateThenStop) => {
            Some((Action::Hibernate, idle_timeout))
        }
        // In the first tier for `idle_timeout` already: the second after another one.
        (VmPhase::Paused, ScaleDown::PauseThenStop) => Some((Action::Stop, idle_timeout * 2)),
        (VmPhase::Paused, ScaleDown::PauseThenHibernate) => Some((Action::Hibernate, idle_timeout * 2)),
        (VmPhase::Hibernated, ScaleDown::HibernateThenStop) => Some((Action::Stop, idle_timeout * 2)),
        _ => None,
    }
}

/// When a VM last active here at `local` (and, as any replica recorded, at `shared`)
/// has been idle for `idle_for`. Another replica may be feeding the VM: it is not idle
/// while anyone's recorded activity is recent. (Stops are also compare-and-set in the
/// backend.)
pub(super) fn due(local: Instant, shared: Option<SystemTime>, idle_for: Duration) -> Instant {
    let mut due = local + idle_for;
    if let Some(shared) = shared {
        let age = SystemTime::now().duration_since(shared).unwrap_or_default();
        let now = Instant::now();
        let shared_local = now.checked_sub(age).unwrap_or(now);
        due = due.max(shared_local + idle_for);
    }
    due
}

/// This replica's last activity on the wall clock, for the shared record.
pub(super) fn wall_clock(at: Instant) -> SystemTime {
    SystemTime::now() - Instant::now().saturating_duration_since(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_policy() {
        let t = Duration::from_secs(10);
        assert_eq!(plan(VmPhase::Ready, ScaleDown::Stop, t), Some((Action::Stop, t)));
        assert_eq!(plan(VmPhase::Ready, ScaleDown::Pause, t), Some((Action::Pause, t)));
        assert_eq!(plan(VmPhase::Paused, ScaleDown::Pause, t), None);
        assert_eq!(
            plan(VmPhase::Paused, ScaleDown::PauseThenStop, t),
            Some((Action::Stop, t * 2))
        );
        assert_eq!(plan(VmPhase::Starting, ScaleDown::Stop, t), None);
        assert_eq!(
            plan(VmPhase::Ready, ScaleDown::Hibernate, t),
            Some((Action::Hibernate, t))
        );
        assert_eq!(plan(VmPhase::Hibernated, ScaleDown::Hibernate, t), None);
        assert_eq!(
            plan(VmPhase::Ready, ScaleDown::PauseThenHibernate, t),
            Some((Action::Pause, t))
        );
        assert_eq!(
            plan(VmPhase::Paused, ScaleDown::PauseThenHibernate, t),
            Some((Action::Hibernate, t * 2))
        );
        assert_eq!(
            plan(VmPhase::Ready, ScaleDown::HibernateThenStop, t),
            Some((Action::Hibernate, t))
        );
        assert_eq!(
            plan(VmPhase::Hibernated, ScaleDown::HibernateThenStop, t),
            Some((Action::Stop, t * 2))
        );
        assert_eq!(plan(VmPhase::Stopped, ScaleDown::Stop, t), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_s_recent_activity_postpones_the_deadline() {
        let idle = Duration::from_secs(30);
        let local = Instant::now();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(due(local, None, idle), local + idle);
        let peer_just_now = SystemTime::now();
        let postponed = due(local, Some(peer_just_now), idle);
        assert!(postponed >= Instant::now() + idle - Duration::from_millis(50));
        let peer_long_ago = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(due(local, Some(peer_long_ago), idle), local + idle);
    }
}

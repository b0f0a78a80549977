//! One target under one idle policy, in simulated time: what the VM's owner does with a
//! [`Plan`] — keep the target up to the end of the current window, scale it down, start
//! it ahead of the next window, record each idle period — without a clock or a VM.
//!
//! A target started at `t` is ready at `t + boot` and runs from `t` until it is scaled
//! down. An event that finds it not ready waits until it is (and starts it if it is
//! down); its activity ends when it is delivered. The fixed timeout counts from the end
//! of the last activity, the adaptive plan from the last arrival (as the owner's do). A
//! minute with events is a cold start when its first event found the target not ready. A
//! timer due at the same instant as an event fires after it: an event at exactly the end
//! of a window is served.

use std::time::Duration;

use crate::idle_policy::{History, Plan, Settings, Step, Window};

/// An idle policy to simulate.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicySpec {
    /// A fixed idle timeout.
    Fixed(Duration),
    /// The adaptive policy with these settings; `fallback` is its idle timeout until it
    /// has learned.
    Adaptive {
        /// The policy's settings.
        settings: Settings,
        /// The idle timeout while the history is too short.
        fallback: Duration,
    },
}

/// What one target did under one policy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Minutes with at least one event.
    pub event_minutes: u64,
    /// Minutes whose first event found the target not ready.
    pub cold_starts: u64,
    /// Time the target ran.
    pub running: Duration,
    /// Starts of any kind.
    pub starts: u64,
    /// Starts ahead of an expected event.
    pub prewarms: u64,
    /// Pre-warms an event came to while they were up.
    pub prewarms_used: u64,
}

/// The target while it is up.
#[derive(Clone, Copy, Debug)]
struct Up {
    since: Duration,
    ready_at: Duration,
    /// When it is scaled down unless an event comes first.
    until: Duration,
    /// Started ahead of an event that has not come yet.
    prewarm: bool,
}

/// A target in simulated time.
struct Simulation<'a> {
    spec: &'a PolicySpec,
    boot: Duration,
    plan: Plan,
    history: Option<History>,
    up: Option<Up>,
    /// The next pre-warm, in absolute time, while the target is down.
    next: Option<Window>,
    /// What the plan counts from: the last arrival (adaptive) or the end of the last
    /// activity (fixed).
    last: Option<Duration>,
    /// The last arrival.
    last_arrival: Option<Duration>,
    outcome: Outcome,
}

/// Runs `arrivals` (in order) through `spec` until `horizon`.
pub fn simulate(arrivals: &[Duration], horizon: Duration, spec: &PolicySpec, boot: Duration) -> Outcome {
    let mut sim = Simulation::new(spec, boot);
    let mut last_minute = None;
    for &at in arrivals {
        let minute = at.as_secs() / 60;
        let first_in_minute = last_minute != Some(minute);
        last_minute = Some(minute);
        sim.arrive(at, first_in_minute);
    }
    sim.finish(horizon)
}

impl<'a> Simulation<'a> {
    fn new(spec: &'a PolicySpec, boot: Duration) -> Simulation<'a> {
        let (plan, history) = match spec {
            PolicySpec::Fixed(timeout) => (Plan::fixed(*timeout), None),
            PolicySpec::Adaptive { settings, fallback } => (Plan::fixed(*fallback), Some(History::new(settings.bin))),
        };
        Simulation {
            spec,
            boot,
            plan,
            history,
            up: None,
            next: None,
            last: None,
            last_arrival: None,
            outcome: Outcome::default(),
        }
    }

    /// Fires every timer due before `to` (not at it: an event at `to` comes first).
    fn advance(&mut self, to: Duration) {
        loop {
            if let Some(up) = self.up {
                if up.until >= to {
                    return;
                }
                self.scale_down(up);
                continue;
            }
            match self.next {
                Some(window) if window.start < to => {
                    self.next = None;
                    self.outcome.starts += 1;
                    self.outcome.prewarms += 1;
                    self.up = Some(Up {
                        since: window.start,
                        ready_at: window.start + self.boot,
                        until: window.until,
                        prewarm: true,
                    });
                }
                _ => return,
            }
        }
    }

    fn scale_down(&mut self, up: Up) {
        self.outcome.running += up.until - up.since;
        self.up = None;
        let last = self.last.unwrap_or_default();
        self.next = match self.plan.step(up.until.saturating_sub(last)) {
            Step::Down { next: Some(w) } => Some(Window {
                start: last + w.start,
                ready: last + w.ready,
                until: last + w.until,
            }),
            _ => None,
        };
    }

    fn arrive(&mut self, at: Duration, first_in_minute: bool) {
        self.advance(at);
        // An arrival while earlier events wait for a boot is part of their activity.
        let busy = self.up.is_some_and(|up| !up.prewarm && at < up.ready_at);
        if !busy {
            self.learn(at);
        }
        self.outcome.event_minutes += u64::from(first_in_minute);
        let ready = self.up.is_some_and(|up| up.ready_at <= at);
        if !ready && first_in_minute {
            self.outcome.cold_starts += 1;
        }
        let up = self.up.get_or_insert_with(|| {
            self.outcome.starts += 1;
            Up {
                since: at,
                ready_at: at + self.boot,
                until: Duration::MAX,
                prewarm: false,
            }
        });
        if up.prewarm {
            up.prewarm = false;
            self.outcome.prewarms_used += 1;
        }
        self.next = None;
        let ready_at = up.ready_at;
        self.last_arrival = Some(at);
        let from = match self.spec {
            PolicySpec::Fixed(_) => at.max(ready_at),
            PolicySpec::Adaptive { .. } => at,
        };
        let last = self.last.map_or(from, |l| l.max(from));
        self.last = Some(last);
        let keep_alive = match self.plan.step(Duration::ZERO) {
            Step::Up { until } => until,
            Step::Down { .. } => Duration::ZERO,
        };
        let up = self.up.as_mut().expect("up");
        up.until = (last + keep_alive).max(ready_at);
    }

    /// Records the idle period that `at` ends, and plans anew if it counted.
    fn learn(&mut self, at: Duration) {
        let (PolicySpec::Adaptive { settings, fallback }, Some(history), Some(last)) =
            (self.spec, self.history.as_mut(), self.last_arrival)
        else {
            return;
        };
        if at > last && history.record(at - last, settings) {
            let lead = settings.lead(self.boot);
            self.plan = Plan::adaptive(Some(history), settings, lead, *fallback);
        }
    }

    fn finish(mut self, horizon: Duration) -> Outcome {
        self.advance(horizon);
        if let Some(up) = self.up {
            self.outcome.running += horizon.saturating_sub(up.since);
        }
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn minutes(list: &[u32]) -> Vec<Duration> {
        list.iter().map(|m| MIN * *m).collect()
    }

    #[test]
    fn a_fixed_timeout_keeps_the_target_up_that_long_after_each_event() {
        // Events at 0, 5 and 30 minutes, a 10-minute timeout, a 1-minute boot.
        let out = simulate(&minutes(&[0, 5, 30]), MIN * 60, &PolicySpec::Fixed(MIN * 10), MIN);
        assert_eq!(out.event_minutes, 3);
        assert_eq!(out.cold_starts, 2, "0 and 30 are cold, 5 is warm");
        // Up 0..15 (the first event delivered at 1, the second at 5: down at 15), then
        // 30..41 (delivered at 31).
        assert_eq!(out.running, MIN * 26);
        assert_eq!(out.starts, 2);
    }

    #[test]
    fn an_event_at_the_end_of_the_timeout_is_served() {
        let out = simulate(&minutes(&[0, 11]), MIN * 30, &PolicySpec::Fixed(MIN * 10), MIN);
        assert_eq!(
            out.cold_starts, 1,
            "delivered at 1, up until 11: the event at 11 is warm"
        );
    }

    #[test]
    fn the_adaptive_policy_learns_a_period_and_prewarms_for_it() {
        // One event every 20 minutes for a day.
        let arrivals: Vec<_> = (0..72).map(|i| MIN * 20 * i).collect();
        let adaptive = PolicySpec::Adaptive {
            settings: Settings::default(),
            fallback: MIN * 10,
        };
        let out = simulate(&arrivals, MIN * 1440, &adaptive, MIN);
        let fixed = simulate(&arrivals, MIN * 1440, &PolicySpec::Fixed(MIN * 10), MIN);
        assert_eq!(fixed.cold_starts, 72, "a 10-minute timeout never sees the next event");
        assert!(out.cold_starts <= 6, "learned within a few periods: {out:?}");
        assert!(out.prewarms_used >= 60, "{out:?}");
        assert!(out.running < fixed.running, "{out:?} vs {fixed:?}");
    }

    #[test]
    fn nothing_runs_past_the_horizon() {
        let out = simulate(&minutes(&[58]), MIN * 60, &PolicySpec::Fixed(MIN * 10), MIN);
        assert_eq!(out.running, MIN * 2);
    }
}

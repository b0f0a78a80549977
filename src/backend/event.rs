//! What happens in a VM's life that its operators want to read: [`VmEvent`], with the
//! reason, action and message a person understands. The same text is the INFO log line
//! (`lifecycle`) and, on Kubernetes, the Event on the target object (`kubevirt::events`).

use std::time::Duration;

/// The CloudEvent that made a VM start (for the `ScaledUp` Event).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trigger {
    /// Its `id`.
    pub id: String,
    /// Its `source`.
    pub source: String,
    /// The trace it is part of, when traces are exported (for the log line).
    pub trace_id: Option<String>,
}

/// Something in a VM's life its operators want to see where they look first
/// (`kubectl describe`: a Kubernetes Event on the target object).
#[derive(Clone, Debug, PartialEq)]
pub enum VmEvent {
    /// A start was issued: a boot, a resume or a restore.
    ScaledUp {
        /// `boot`, `resume` or `restore`.
        kind: &'static str,
        /// The event that started it; `None` for a keep-warm window, a pre-warm or an
        /// operator's start.
        trigger: Option<Trigger>,
        /// Events held when the start was issued.
        held: usize,
        /// Started ahead of the event the adaptive idle policy expects next.
        predicted: bool,
    },
    /// The guest answered: the cold start is over.
    Ready {
        /// First held event's arrival (or the start) → the guest answered.
        cold_start: Duration,
        /// The start call.
        start_call: Duration,
        /// The call's return → the backend reported the VM running.
        boot: Duration,
        /// Running → the guest answered its probe.
        probe: Duration,
        /// Events released.
        held: usize,
    },
    /// Scaled down after being idle (or by an operator).
    ScaledDown {
        /// `stop`, `pause` or `hibernate`.
        action: &'static str,
        /// How long it had been idle.
        idle_for: Duration,
    },
    /// The start failed; the held events were answered 503.
    StartFailed {
        /// Why.
        reason: String,
        /// Held events answered 503.
        answered: usize,
    },
    /// The VM was not ready within its start timeout; the held events were answered 503.
    StartTimedOut {
        /// The start timeout.
        after: Duration,
        /// Held events answered 503.
        answered: usize,
    },
}

impl VmEvent {
    /// `PascalCase`, as Kubernetes Events have it.
    pub fn reason(&self) -> &'static str {
        match self {
            VmEvent::ScaledUp { .. } => "ScaledUp",
            VmEvent::Ready { .. } => "Ready",
            VmEvent::ScaledDown { action: "pause", .. } => "Paused",
            VmEvent::ScaledDown {
                action: "hibernate", ..
            } => "Hibernated",
            VmEvent::ScaledDown { .. } => "ScaledDown",
            VmEvent::StartFailed { .. } => "StartFailed",
            VmEvent::StartTimedOut { .. } => "StartTimedOut",
        }
    }

    /// What was done: `Start`, `Resume`, `Restore`, `Probe`, `Stop`, `Pause`, `Hibernate`.
    pub fn action(&self) -> &'static str {
        match self {
            VmEvent::ScaledUp { kind: "resume", .. } => "Resume",
            VmEvent::ScaledUp { kind: "restore", .. } => "Restore",
            VmEvent::ScaledUp { .. } | VmEvent::StartFailed { .. } | VmEvent::StartTimedOut { .. } => "Start",
            VmEvent::Ready { .. } => "Probe",
            VmEvent::ScaledDown { action: "pause", .. } => "Pause",
            VmEvent::ScaledDown {
                action: "hibernate", ..
            } => "Hibernate",
            VmEvent::ScaledDown { .. } => "Stop",
        }
    }

    /// Whether something went wrong.
    pub fn is_warning(&self) -> bool {
        matches!(self, VmEvent::StartFailed { .. } | VmEvent::StartTimedOut { .. })
    }

    /// The sentence a person reads.
    pub fn message(&self) -> String {
        match self {
            VmEvent::ScaledUp {
                kind,
                trigger,
                held,
                predicted,
            } => {
                let cause = match trigger {
                    Some(Trigger { id, source, .. }) => format!("started ({kind}) for CloudEvent id={id} source={source}"),
                    None if *predicted => {
                        format!("started ({kind}) ahead of the next event, as the adaptive idle policy predicts it")
                    }
                    None => format!("started ({kind}) without an event: keep-warm window, pre-warm or an operator"),
                };
                format!("{cause}; {held} event(s) held")
            }
            VmEvent::Ready {
                cold_start,
                start_call,
                boot,
                probe,
                held,
            } => format!(
                "guest answered: cold start {} ms (start call {} ms, boot {} ms, probe {} ms); {held} held event(s) released",
                cold_start.as_millis(),
                start_call.as_millis(),
                boot.as_millis(),
                probe.as_millis()
            ),
            VmEvent::ScaledDown { action, idle_for } => {
                let idle = humantime::format_duration(Duration::from_secs(idle_for.as_secs()));
                format!("{action} after {idle} without events")
            }
            VmEvent::StartFailed { reason, answered } => format!("{reason}; {answered} held event(s) answered 503"),
            VmEvent::StartTimedOut { after, answered } => format!(
                "not ready within {}; {answered} held event(s) answered 503",
                humantime::format_duration(*after)
            ),
        }
    }
}

//! The idle section: how often idleness is checked, the default idle policy, and the
//! adaptive policy's settings (`idle.adaptive`, checked by `idle_policy::Settings`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::human_duration;
use crate::idle_policy::{IdlePolicy, Settings};

/// The idle scaler.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleConfig {
    /// How often idleness is checked. Default 1s.
    #[serde(with = "human_duration")]
    pub check_interval: Duration,
    /// The idle policy of targets that do not choose one (`vms[].idle_policy`, annotation
    /// `vm-activator.io/idle-policy`): `fixed` (the idle timeout) or `adaptive`. Default
    /// fixed.
    pub policy: IdlePolicy,
    /// The adaptive policy's settings.
    pub adaptive: AdaptiveConfig,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(1),
            policy: IdlePolicy::Fixed,
            adaptive: AdaptiveConfig::default(),
        }
    }
}

/// The adaptive idle policy's settings (`idle.adaptive`). Every bound is in bins of
/// `bin`: a test with 1 s bins is a miniature of the real thing at 1 min.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Histogram bin width: the resolution of every decision. Default 1m.
    #[serde(with = "human_duration")]
    pub bin: Duration,
    /// Longest idle time told apart; longer ones count as "out of range". At most 1440
    /// bins. Default 4h.
    #[serde(with = "human_duration")]
    pub range: Duration,
    /// Never scaled down sooner than this after the last activity; at least one bin.
    /// Default: one bin.
    #[serde(default, with = "human_duration::option")]
    pub min_keep_alive: Option<Duration>,
    /// No keep-alive or pre-warm reaches further than this from the last activity.
    /// Default: the range.
    #[serde(default, with = "human_duration::option")]
    pub max_keep_alive: Option<Duration>,
    /// What one cold start is worth in running time: a target is kept up (or started
    /// ahead) only where the cold starts that saves are worth the time it runs.
    /// Default 50m.
    #[serde(with = "human_duration")]
    pub cold_start_cost: Duration,
    /// Fewer idle periods than this in a target's history: its idle timeout applies.
    /// Default 3.
    pub min_samples: u32,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        let settings = Settings::default();
        Self {
            bin: settings.bin,
            range: settings.range,
            min_keep_alive: None,
            max_keep_alive: None,
            cold_start_cost: settings.cold_start_cost,
            min_samples: settings.min_samples,
        }
    }
}

impl AdaptiveConfig {
    /// The policy's settings, unset bounds filled in.
    pub fn settings(&self) -> Settings {
        Settings {
            bin: self.bin,
            range: self.range,
            min_keep_alive: self.min_keep_alive.unwrap_or(self.bin),
            max_keep_alive: self.max_keep_alive.unwrap_or(self.range),
            cold_start_cost: self.cold_start_cost,
            min_samples: self.min_samples,
        }
    }
}

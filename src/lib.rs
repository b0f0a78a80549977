//! vm-activator: scale-to-zero for virtual machines, driven by CloudEvents.
//!
//! The first CloudEvent addressed to a stopped VM starts it; the activator holds that
//! event and every later one until the guest application answers, delivers them, and
//! stops the VM again once it has been idle. docs/architecture.md describes the layers:
//! `server` → `ingress` → `activator` (registry) → `lifecycle` (one owner per VM) →
//! `backend` (trait), `readiness`; `ingress` → `proxy`, `auth`; everything → `vm`,
//! `metrics`, its own `config` section.

#![deny(missing_docs)]

pub mod activator;
pub mod auth;
pub mod backend;
pub mod clock;
pub mod config;
pub mod http1;
pub mod idle_policy;
pub mod ingress;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod server;
pub mod simulate;
pub mod telemetry;
pub mod vm;

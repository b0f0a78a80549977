//! vm-activator: scale-to-zero for virtual machines, driven by CloudEvents.
//!
//! The first CloudEvent addressed to a stopped VM starts it; the activator holds that
//! event and every later one until the guest application answers, delivers them, and
//! stops the VM again once it has been idle. See `DESIGN.md` §3 for how the modules
//! below depend on each other: `server` → `ingress` → `activator` → `gate`, `backend`
//! (trait), `readiness`; `ingress` → `proxy`; `idle` → `activator`, `backend`.

#![deny(missing_docs)]

pub mod activator;
pub mod auth;
pub mod backend;
pub mod config;
pub mod gate;
pub mod idle;
pub mod ingress;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod server;
pub mod vm;

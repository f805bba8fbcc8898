//! latch: a node-level credential broker for unmodified applications.
//!
//! See ARCHITECTURE.md for the map. In short: [`ebpf`] loads the programs that redirect
//! connects; [`broker`] accepts the redirected connections and hands them to a [`connector`];
//! [`relay`] moves bytes; [`config`] is the validated resource model; [`runtime`] starts and
//! stops it all in order.
pub mod admin;
pub mod audit;
pub mod audit_limit;
pub mod broker;
pub mod ca;
pub mod cgroup;
pub mod config;
pub mod connector;
pub mod crs;
pub mod dns;
pub mod doctor;
pub mod ebpf;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod origin;
pub mod pods;
pub mod policy_set;
pub mod privileges;
pub mod refusals;
pub mod relay;
pub mod runtime;
pub mod secrets;
pub mod telemetry;
pub mod upgrade;
pub mod watch;
pub mod wipe;

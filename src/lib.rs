//! freezeframe: catches the freezes that logs and CPU charts never show.
//!
//! The modules follow the data. [`ingest`] receives OTLP metrics and
//! traces as [`signals`]; [`trigger`] evaluates rules over them; [`capture`]
//! takes off-CPU stacks out of the kernel and keeps the flight recorder;
//! [`symbolize`] names their frames (and [`process_map`] says what a process
//! has mapped, for it and the unwinder); [`profile`] is the model every encoder
//! in [`encode`] reads; [`export`] writes captures out, and [`report`]
//! summarises them for people. [`forward`] sends the app's telemetry on to
//! its backends, as received. [`app`] wires the sidecar together, and
//! [`demo`] runs it against the bundled reproducer of the seed incident.

pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod demo;
pub mod encode;
pub mod export;
pub mod forward;
pub mod ingest;
pub mod logging;
pub mod preflight;
pub mod process_map;
pub mod profile;
pub mod report;
pub mod signals;
pub mod symbolize;
pub mod telemetry;
pub mod trigger;
pub mod unwind;

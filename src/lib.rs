//! freezeframe: catches the freezes that logs and CPU charts never show.
//!
//! The modules follow the data: [`capture`] takes off-CPU stacks out of the
//! kernel, [`symbolize`] names their frames, [`profile`] is the model every
//! encoder in [`encode`] reads, and [`report`] summarises it for people.

pub mod capture;
pub mod cli;
pub mod encode;
pub mod preflight;
pub mod profile;
pub mod report;
pub mod symbolize;

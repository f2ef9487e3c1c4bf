//! Where finished captures go: files in the export directory, and OTLP
//! profiles to a backend.

pub mod files;
pub mod links;
pub mod retry;

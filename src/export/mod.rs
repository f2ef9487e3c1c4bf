//! Where finished captures go: files in the export directory, and OTLP
//! profiles to a backend.

pub mod files;
pub mod links;
pub mod otlp;
pub mod retry;

use std::path::PathBuf;

/// Why exporting could not start or a request could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("TLS file {path:?}: {problem} (check [export] certificate, client_certificate, client_key and the OTEL_EXPORTER_OTLP_*CERTIFICATE/KEY variables)")]
    Tls { path: PathBuf, problem: String },
    #[error("OTLP endpoint {endpoint}: {problem}")]
    Endpoint { endpoint: String, problem: String },
    #[error(transparent)]
    Settings(#[from] otlp::settings::SettingsError),
}

//! Where finished captures go: files in the export directory, and OTLP
//! profiles to a backend.

pub mod delivery;
pub mod files;
pub mod links;
pub mod otlp;
pub mod retry;
pub mod spool;

use std::path::PathBuf;

/// Why exporting could not start or a request could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "cannot use the delivery spool at {path}: {source} \
         (it lives in [export] directory, which must be writable)"
    )]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS file {path:?}: {problem} (check [export] certificate, client_certificate, client_key and the OTEL_EXPORTER_OTLP_*CERTIFICATE/KEY variables)")]
    Tls { path: PathBuf, problem: String },
    #[error("OTLP endpoint {endpoint}: {problem}")]
    Endpoint { endpoint: String, problem: String },
    #[error(transparent)]
    Settings(#[from] otlp::settings::SettingsError),
}

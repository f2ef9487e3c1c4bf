//! The PEM files of `[export]` TLS, read and checked once at start-up so
//! that a wrong path is a start-up error, not a failed export hours later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Tls;
use crate::export::ExportError;

/// The PEM files' contents.
pub struct TlsFiles {
    /// A CA to trust besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate chain and key, for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    pub fn read(tls: &Tls) -> Result<Self, ExportError> {
        let ca_pem = tls
            .certificate
            .as_deref()
            .map(|path| {
                let pem = read(path)?;
                certificates(path, &pem)?;
                Ok::<_, ExportError>(pem)
            })
            .transpose()?;
        let identity_pem = match (&tls.client_certificate, &tls.client_key) {
            (Some(certificate), Some(key)) => {
                let (certificate_pem, key_pem) = (read(certificate)?, read(key)?);
                certificates(certificate, &certificate_pem)?;
                private_key(key, &key_pem)?;
                Some((certificate_pem, key_pem))
            }
            _ => None,
        };
        Ok(TlsFiles {
            ca_pem,
            identity_pem,
        })
    }

    /// A rustls client configuration: the system's roots and our CA, and
    /// the client certificate if there is one.
    pub fn rustls_config(&self, tls: &Tls) -> Result<rustls::ClientConfig, ExportError> {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates are skipped: a configured CA may be
        // all that is needed.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let (Some(pem), Some(path)) = (&self.ca_pem, &tls.certificate) {
            for certificate in certificates(path, pem)? {
                roots.add(certificate).map_err(|err| ExportError::Tls {
                    path: path.clone(),
                    problem: err.to_string(),
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| ExportError::Tls {
                path: PathBuf::new(),
                problem: err.to_string(),
            })?
            .with_root_certificates(roots);
        match (&self.identity_pem, &tls.client_certificate, &tls.client_key) {
            (Some((certificate_pem, key_pem)), Some(certificate), Some(key)) => builder
                .with_client_auth_cert(
                    certificates(certificate, certificate_pem)?,
                    private_key(key, key_pem)?,
                )
                .map_err(|err| ExportError::Tls {
                    path: key.clone(),
                    problem: err.to_string(),
                }),
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|err| ExportError::Tls {
        path: path.to_path_buf(),
        problem: err.to_string(),
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ExportError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| ExportError::Tls {
            path: path.to_path_buf(),
            problem: err.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(ExportError::Tls {
            path: path.to_path_buf(),
            problem: "no PEM certificate in it".to_string(),
        });
    }
    Ok(certificates)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, ExportError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| ExportError::Tls {
        path: path.to_path_buf(),
        problem: format!("no PEM private key in it ({err})"),
    })
}

//! OTLP/gRPC: `ProfilesService/Export` on a tonic channel.
//!
//! Requests are sent as the bytes the spool (or the forward queue) holds,
//! without decoding them again: a pass-through codec writes them as the
//! message.

use std::str::FromStr;

use bytes::{BufMut, Bytes};
use http::uri::PathAndQuery;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::settings::{Compression, OtlpSettings};
use super::ExportResponse;
use crate::export::http::tls::TlsFiles;
use crate::export::retry::{classify_grpc, grpc_retry_delay};
use crate::export::{Attempt, ExportError};

const EXPORT_PATH: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// Answers are small; a backend sending more is not talking OTLP.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct GrpcExporter {
    channel: Channel,
    /// The export method called.
    path: PathAndQuery,
    metadata: MetadataMap,
    compression: Compression,
    timeout: std::time::Duration,
}

impl GrpcExporter {
    /// A lazily connecting channel: the backend may be down at start-up.
    pub fn new(settings: &OtlpSettings) -> Result<Self, ExportError> {
        let invalid = |problem: String| ExportError::Endpoint {
            endpoint: settings.endpoint.clone(),
            problem,
        };
        let mut endpoint = Endpoint::from_str(&settings.endpoint)
            .map_err(|err| invalid(err.to_string()))?
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("freezeframe/", env!("CARGO_PKG_VERSION")))
            .map_err(|err| invalid(err.to_string()))?;
        if settings.uses_tls() {
            let files = TlsFiles::read(&settings.tls)?;
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = files.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((certificate, key)) = files.identity_pem {
                tls = tls.identity(Identity::from_pem(certificate, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|err| invalid(format!("TLS: {err}")))?;
        }
        let mut metadata = MetadataMap::new();
        for (key, value) in &settings.headers {
            let key = AsciiMetadataKey::from_str(key)
                .map_err(|_| invalid(format!("header {key:?} cannot be gRPC metadata")))?;
            let value = AsciiMetadataValue::from_str(value).map_err(|_| {
                invalid(format!("the value of header {key} cannot be gRPC metadata"))
            })?;
            metadata.insert(key, value);
        }
        Ok(GrpcExporter {
            channel: endpoint.connect_lazy(),
            path: PathAndQuery::from_static(EXPORT_PATH),
            metadata,
            compression: settings.compression,
            timeout: settings.timeout,
        })
    }

    /// This exporter calling the export method `path` instead; the channel,
    /// and so the connection, is shared.
    pub fn calling(&self, path: &'static str) -> Self {
        GrpcExporter {
            path: PathAndQuery::from_static(path),
            ..self.clone()
        }
    }

    pub async fn send(&self, body: Bytes) -> Attempt {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        if self.compression == Compression::Gzip {
            grpc = grpc.send_compressed(CompressionEncoding::Gzip);
        }
        if let Err(err) = grpc.ready().await {
            return Attempt::failed_retryable(format!("cannot reach the backend: {err}"));
        }
        let mut request = tonic::Request::new(body);
        *request.metadata_mut() = self.metadata.clone();
        // Tells the server how long we wait (grpc-timeout).
        request.set_timeout(self.timeout);
        match grpc.unary(request, self.path.clone(), PassThrough).await {
            Ok(response) => response.into_inner().accepted(),
            Err(status) => failed(&status),
        }
    }
}

fn failed(status: &Status) -> Attempt {
    let retry_delay = grpc_retry_delay(status.details());
    let reason = match status.code() {
        // tonic reports a connection that could not be made as UNAVAILABLE
        // with the transport error as message; say it plainly.
        Code::Unavailable if status.message().contains("connect") => {
            format!("cannot connect: {}", status.message())
        }
        code => format!("gRPC {code:?}: {}", status.message()),
    };
    Attempt::Failed {
        verdict: classify_grpc(status.code(), retry_delay),
        reason,
    }
}

/// Encodes the request bytes as they are; decodes the response.
struct PassThrough;

impl Codec for PassThrough {
    type Encode = Bytes;
    type Decode = ExportResponse;
    type Encoder = PassThrough;
    type Decoder = PassThrough;

    fn encoder(&mut self) -> Self::Encoder {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        PassThrough
    }
}

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buffer.put(item);
        Ok(())
    }
}

impl Decoder for PassThrough {
    type Item = ExportResponse;
    type Error = Status;

    fn decode(&mut self, buffer: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ExportResponse::decode(buffer)
            .map(Some)
            .map_err(|err| Status::internal(format!("the backend's answer is not OTLP: {err}")))
    }
}

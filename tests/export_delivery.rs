//! Delivery against in-process backends, one per transport: what is
//! retried and when, what is final, what a partial success looks like,
//! and that a backend that comes back late gets every request exactly once.
//! (The end-to-end tests do the same against Python receivers.)

use std::collections::VecDeque;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
    ProfilesService, ProfilesServiceServer,
};
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesPartialSuccess, ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use prost::Message;
use tokio_util::sync::CancellationToken;

use freezeframe::export::delivery::{deliver, Delivered, Delivery};
use freezeframe::export::otlp::settings::{self, Explicit};
use freezeframe::export::otlp::{Compression, Exporter, Protocol};
use freezeframe::export::retry::Backoff;
use freezeframe::export::spool::Spool;
use freezeframe::export::Format;

const QUICK: Backoff = Backoff {
    initial: Duration::from_millis(50),
    max: Duration::from_millis(200),
};

/// A request as the backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A scripted answer: status, headers, body.
type Answer = (StatusCode, Vec<(&'static str, &'static str)>, Vec<u8>);

/// What the backend answers, request by request; then 200.
#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Answer>>,
    seen: Mutex<Vec<Seen>>,
}

impl Script {
    fn new(answers: Vec<Answer>) -> Arc<Self> {
        Arc::new(Script {
            answers: Mutex::new(answers.into()),
            seen: Mutex::default(),
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn http_export(
    State(script): State<Arc<Script>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut body = body.to_vec();
    if headers
        .get("content-encoding")
        .is_some_and(|value| value == "gzip")
    {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(body.as_slice())
            .read_to_end(&mut plain)
            .unwrap();
        body = plain;
    }
    script.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        headers,
        body,
    });
    let (status, extra, answer) = script.answers.lock().unwrap().pop_front().unwrap_or((
        StatusCode::OK,
        Vec::new(),
        Vec::new(),
    ));
    let mut headers = HeaderMap::new();
    for (key, value) in extra {
        headers.insert(key, value.parse().unwrap());
    }
    (status, headers, answer)
}

async fn http_backend_on(listener: tokio::net::TcpListener, script: Arc<Script>) {
    let router = Router::new()
        .route("/v1development/profiles", post(http_export))
        .with_state(script);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
}

async fn http_backend(script: Arc<Script>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    http_backend_on(listener, script).await;
    address
}

/// The gRPC backend's script: a status per request, then OK.
#[derive(Default)]
struct GrpcScript {
    answers: Mutex<VecDeque<tonic::Status>>,
    seen: Mutex<
        Vec<(
            Instant,
            tonic::metadata::MetadataMap,
            ExportProfilesServiceRequest,
        )>,
    >,
}

struct GrpcBackend(Arc<GrpcScript>);

#[tonic::async_trait]
impl ProfilesService for GrpcBackend {
    async fn export(
        &self,
        request: tonic::Request<ExportProfilesServiceRequest>,
    ) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
        let metadata = request.metadata().clone();
        self.0
            .seen
            .lock()
            .unwrap()
            .push((Instant::now(), metadata, request.into_inner()));
        match self.0.answers.lock().unwrap().pop_front() {
            Some(status) => Err(status),
            None => Ok(tonic::Response::new(
                ExportProfilesServiceResponse::default(),
            )),
        }
    }
}

async fn grpc_backend(script: Arc<GrpcScript>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = ProfilesServiceServer::new(GrpcBackend(script))
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(
                service,
                tonic::transport::server::TcpIncoming::from(listener),
            )
            .await
            .unwrap()
    });
    address
}

fn exporter(protocol: Protocol, address: SocketAddr, compression: Compression) -> Exporter {
    let settings = settings::resolve(
        Explicit {
            endpoint: Some(format!("http://{address}")),
            protocol: Some(protocol),
            headers: Some(vec![("x-scope-orgid".into(), "tenant-7".into())]),
            timeout: Some(Duration::from_secs(5)),
            compression: Some(compression),
            ..Explicit::default()
        },
        |_| None,
    )
    .unwrap()
    .unwrap();
    Exporter::new(&settings).unwrap()
}

/// A small, valid export request, told apart by its profile id.
fn request(number: u8) -> Vec<u8> {
    let mut request = ExportProfilesServiceRequest::default();
    request.resource_profiles.push(Default::default());
    request.resource_profiles[0]
        .scope_profiles
        .push(Default::default());
    request.resource_profiles[0].scope_profiles[0]
        .profiles
        .push(
            opentelemetry_proto::tonic::profiles::v1development::Profile {
                profile_id: vec![number; 16],
                ..Default::default()
            },
        );
    request.encode_to_vec()
}

async fn send(exporter: &Exporter, body: Vec<u8>) -> (Option<Delivered>, usize) {
    let mut retries = 0;
    let delivered = deliver(
        exporter,
        body.into(),
        QUICK,
        &CancellationToken::new(),
        |_, _, _| retries += 1,
    )
    .await;
    (delivered, retries)
}

/// A port nobody listens on (yet).
fn unused_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn http_retries_after_the_time_the_backend_asks_for() {
    let script = Script::new(vec![
        (
            StatusCode::SERVICE_UNAVAILABLE,
            vec![("retry-after", "1")],
            Vec::new(),
        ),
        (
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", "1")],
            Vec::new(),
        ),
    ]);
    let exporter = exporter(
        Protocol::HttpProtobuf,
        http_backend(Arc::clone(&script)).await,
        Compression::None,
    );
    let (delivered, retries) = send(&exporter, request(1)).await;
    assert!(
        matches!(delivered, Some(Delivered::Accepted { rejected: 0, .. })),
        "{delivered:?}"
    );
    assert_eq!(retries, 2);
    let seen = script.seen();
    assert_eq!(seen.len(), 3);
    for pair in seen.windows(2) {
        let waited = pair[1].at - pair[0].at;
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1800),
            "waited {waited:?} where the backend asked for 1s"
        );
    }
    assert_eq!(seen[0].headers["x-scope-orgid"], "tenant-7");
    assert_eq!(seen[0].headers["content-type"], "application/x-protobuf");
    assert_eq!(seen[2].body, request(1));
}

#[tokio::test]
async fn http_gateway_errors_retry_and_client_errors_are_final() {
    let script = Script::new(vec![
        (StatusCode::BAD_GATEWAY, Vec::new(), Vec::new()),
        (StatusCode::GATEWAY_TIMEOUT, Vec::new(), Vec::new()),
        (StatusCode::OK, Vec::new(), Vec::new()),
        (
            StatusCode::BAD_REQUEST,
            Vec::new(),
            b"profile has no samples".to_vec(),
        ),
    ]);
    let exporter = exporter(
        Protocol::HttpProtobuf,
        http_backend(Arc::clone(&script)).await,
        Compression::Gzip,
    );
    let (delivered, retries) = send(&exporter, request(1)).await;
    assert!(matches!(delivered, Some(Delivered::Accepted { .. })));
    assert_eq!(retries, 2);
    let (refused, retries) = send(&exporter, request(2)).await;
    assert_eq!(retries, 0, "a 400 is never retried");
    match refused {
        Some(Delivered::Rejected { reason }) => {
            assert!(
                reason.contains("400") && reason.contains("profile has no samples"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let seen = script.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0].headers["content-encoding"], "gzip");
    assert_eq!(seen[0].body, request(1), "gzip undone, the same bytes");
}

#[tokio::test]
async fn a_partial_success_is_reported() {
    let partial = ExportProfilesServiceResponse {
        partial_success: Some(ExportProfilesPartialSuccess {
            rejected_profiles: 1,
            error_message: "profile too old".into(),
        }),
    };
    let script = Script::new(vec![(StatusCode::OK, Vec::new(), partial.encode_to_vec())]);
    let exporter = exporter(
        Protocol::HttpProtobuf,
        http_backend(script).await,
        Compression::None,
    );
    let (delivered, _) = send(&exporter, request(1)).await;
    assert_eq!(
        delivered,
        Some(Delivered::Accepted {
            rejected: 1,
            message: "profile too old".into()
        })
    );
}

#[tokio::test]
async fn grpc_unavailable_retries_and_invalid_argument_is_final() {
    let script = Arc::new(GrpcScript::default());
    script.answers.lock().unwrap().extend([
        tonic::Status::unavailable("warming up"),
        tonic::Status::deadline_exceeded("slow"),
    ]);
    let exporter = exporter(
        Protocol::Grpc,
        grpc_backend(Arc::clone(&script)).await,
        Compression::Gzip,
    );
    let (delivered, retries) = send(&exporter, request(1)).await;
    assert!(
        matches!(delivered, Some(Delivered::Accepted { rejected: 0, .. })),
        "{delivered:?}"
    );
    assert_eq!(retries, 2);

    script.answers.lock().unwrap().extend([
        tonic::Status::invalid_argument("bad dictionary"),
        tonic::Status::resource_exhausted("no RetryInfo: final"),
    ]);
    for number in [2, 3] {
        let (refused, retries) = send(&exporter, request(number)).await;
        assert_eq!(retries, 0);
        assert!(
            matches!(refused, Some(Delivered::Rejected { .. })),
            "{refused:?}"
        );
    }
    let seen = script.seen.lock().unwrap();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[0].1.get("x-scope-orgid").unwrap(), "tenant-7");
    assert_eq!(
        seen[2].2.encode_to_vec(),
        request(1),
        "the spooled bytes, decoded by tonic"
    );
}

/// `google.rpc.Status` with a `RetryInfo`, as a server attaches it.
fn retry_info_details(delay: Duration) -> Vec<u8> {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(message, repeated, tag = "3")]
        details: Vec<prost_types_any::Any>,
    }
    mod prost_types_any {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Any {
            #[prost(string, tag = "1")]
            pub type_url: String,
            #[prost(bytes = "vec", tag = "2")]
            pub value: Vec<u8>,
        }
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        retry_delay: Option<ProtoDuration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct ProtoDuration {
        #[prost(int64, tag = "1")]
        seconds: i64,
        #[prost(int32, tag = "2")]
        nanos: i32,
    }
    RpcStatus {
        code: tonic::Code::ResourceExhausted as i32,
        details: vec![prost_types_any::Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
            value: RetryInfo {
                retry_delay: Some(ProtoDuration {
                    seconds: delay.as_secs() as i64,
                    nanos: delay.subsec_nanos() as i32,
                }),
            }
            .encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

#[tokio::test]
async fn grpc_throttling_with_retry_info_waits_as_asked() {
    let script = Arc::new(GrpcScript::default());
    script
        .answers
        .lock()
        .unwrap()
        .push_back(tonic::Status::with_details(
            tonic::Code::ResourceExhausted,
            "slow down",
            retry_info_details(Duration::from_millis(1200)).into(),
        ));
    let exporter = exporter(
        Protocol::Grpc,
        grpc_backend(Arc::clone(&script)).await,
        Compression::None,
    );
    let (delivered, retries) = send(&exporter, request(1)).await;
    assert!(
        matches!(delivered, Some(Delivered::Accepted { .. })),
        "{delivered:?}"
    );
    assert_eq!(retries, 1);
    let seen = script.seen.lock().unwrap();
    let waited = seen[1].0 - seen[0].0;
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(2),
        "waited {waited:?} where RetryInfo said 1.2s"
    );
}

#[tokio::test]
async fn a_backend_that_comes_back_gets_every_spooled_request_exactly_once() {
    // The backend is down.
    let address = unused_address();
    let dir = TempDir::new("delivery-outage");
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    let delivery = Delivery::start(
        spool,
        exporter(Protocol::HttpProtobuf, address, Compression::None),
        "otlp_http",
        QUICK,
        None,
    );
    for number in 1..=3 {
        delivery.submit(
            &format!("capture-{number}"),
            SystemTime::now(),
            &request(number),
        );
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let spooled = std::fs::read_dir(&dir.0).unwrap().count();
    assert_eq!(
        spooled, 3,
        "while the backend is down, everything waits in the spool"
    );

    let script = Script::new(Vec::new());
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    http_backend_on(listener, Arc::clone(&script)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&dir.0).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delivery.finish(Duration::from_secs(1)).await;
    let bodies: Vec<Vec<u8>> = script.seen().into_iter().map(|seen| seen.body).collect();
    assert_eq!(
        bodies,
        [request(1), request(2), request(3)],
        "each once, oldest first"
    );
}

#[tokio::test]
async fn shutdown_leaves_undelivered_requests_in_the_spool() {
    let address = unused_address();
    let dir = TempDir::new("delivery-shutdown");
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    let delivery = Delivery::start(
        spool,
        exporter(Protocol::Grpc, address, Compression::None),
        "otlp_grpc",
        QUICK,
        None,
    );
    delivery.submit("capture", SystemTime::now(), &request(1));
    let started = Instant::now();
    delivery.finish(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown is bounded"
    );
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    let entry = spool.oldest().expect("still spooled for the next run");
    assert_eq!(spool.read(&entry).unwrap().unwrap(), request(1));
}

#[tokio::test]
async fn a_capture_older_than_the_backend_takes_is_dropped_not_sent() {
    let script = Script::new(Vec::new());
    let address = http_backend(Arc::clone(&script)).await;
    let dir = TempDir::new("delivery-expired");
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    let hour = Duration::from_secs(3600);
    let old = SystemTime::now() - 2 * hour;
    spool
        .put("old", Format::OtlpProfiles, old, &request(1))
        .unwrap();
    drop(spool);
    // Its age survives a restart: the file says when its capture started.
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    assert!(spool.oldest().unwrap().started <= old + Duration::from_secs(1));
    let delivery = Delivery::start(
        spool,
        exporter(Protocol::HttpProtobuf, address, Compression::None),
        "otlp_http",
        QUICK,
        Some(hour),
    );
    delivery.submit("fresh", SystemTime::now(), &request(2));
    delivery.finish(Duration::from_secs(5)).await;
    let bodies: Vec<Vec<u8>> = script.seen().into_iter().map(|seen| seen.body).collect();
    assert_eq!(bodies, [request(2)], "the old one is never sent");
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[tokio::test]
async fn retrying_stops_when_the_capture_grows_too_old() {
    // Every attempt fails and is retried.
    let address = unused_address();
    let dir = TempDir::new("delivery-expiring");
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    let max_age = Duration::from_secs(60);
    let delivery = Delivery::start(
        spool,
        exporter(Protocol::HttpProtobuf, address, Compression::None),
        "otlp_http",
        QUICK,
        Some(max_age),
    );
    let nearly_too_old = SystemTime::now() - max_age + Duration::from_millis(600);
    delivery.submit("expiring", nearly_too_old, &request(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        1,
        "still retried"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&dir.0).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "never dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delivery.finish(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_request_spooled_for_another_exporter_is_dropped() {
    let script = Script::new(Vec::new());
    let address = http_backend(Arc::clone(&script)).await;
    let dir = TempDir::new("delivery-other-format");
    let (spool, _) = Spool::open(&dir.0, 1 << 20, 100).unwrap();
    spool
        .put(
            "pushed",
            Format::PyroscopePush,
            SystemTime::now(),
            b"not OTLP",
        )
        .unwrap();
    let delivery = Delivery::start(
        spool,
        exporter(Protocol::HttpProtobuf, address, Compression::None),
        "otlp_http",
        QUICK,
        None,
    );
    delivery.submit("otlp", SystemTime::now(), &request(3));
    delivery.finish(Duration::from_secs(5)).await;
    let bodies: Vec<Vec<u8>> = script.seen().into_iter().map(|seen| seen.body).collect();
    assert_eq!(bodies, [request(3)]);
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

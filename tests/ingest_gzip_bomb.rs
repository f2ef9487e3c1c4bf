//! A gzip bomb sent to the OTLP/HTTP receiver is refused without being
//! inflated. This test measures the peak RSS of its own process, so it lives
//! alone in this binary: other tests would move the peak.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flate2::{Compress, Compression, Crc, FlushCompress};
use freezeframe::ingest::{self, ReceiverConfig, Sinks, SpanStore};
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::StatusCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LIMIT: usize = 4 << 20;
const INFLATED: usize = 1 << 30;

/// A valid gzip stream of `INFLATED` zero bytes, about 1 MiB on the wire.
///
/// Compressing 1 GiB would take the test minutes in a debug build. A full
/// flush ends the deflate block and resets the compressor, so every MiB of
/// zeros compresses to the same bytes: compress one MiB and repeat it.
fn gzip_bomb() -> Vec<u8> {
    const BLOCK: usize = 1 << 20;
    let zeros = vec![0_u8; BLOCK];
    let mut compressor = Compress::new(Compression::default(), false);
    let mut block = Vec::with_capacity(BLOCK);
    compressor
        .compress_vec(&zeros, &mut block, FlushCompress::Full)
        .expect("deflate");
    assert_eq!(
        compressor.total_in(),
        BLOCK as u64,
        "the block went in whole"
    );
    let mut end = Vec::with_capacity(64);
    compressor
        .compress_vec(&[], &mut end, FlushCompress::Finish)
        .expect("deflate");

    // The same trick for the trailer's checksum: combining CRCs is cheap.
    let mut block_crc = Crc::new();
    block_crc.update(&zeros);
    let mut crc = Crc::new();
    let blocks = INFLATED / BLOCK;
    for _ in 0..blocks {
        crc.combine(&block_crc);
    }
    // Header: magic, deflate, no flags, no time, no extra flags, unknown OS.
    let mut bomb = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    for _ in 0..blocks {
        bomb.extend_from_slice(&block);
    }
    bomb.extend_from_slice(&end);
    bomb.extend_from_slice(&crc.sum().to_le_bytes());
    bomb.extend_from_slice(&(INFLATED as u32).to_le_bytes());
    bomb
}

/// Peak resident set size of this process so far, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmHWM line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_refused_without_inflating_it() {
    let bomb = gzip_bomb();
    assert!(
        bomb.len() < LIMIT / 2,
        "the bomb is {} bytes on the wire",
        bomb.len()
    );

    let (metrics, mut batches) = mpsc::channel(8);
    let config = ReceiverConfig {
        grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_request_bytes: LIMIT,
    };
    let sinks = Sinks {
        metrics,
        spans: Arc::new(SpanStore::new(16, Duration::from_secs(60))),
        forward: None,
    };
    let stop = CancellationToken::new();
    let running = ingest::serve(config, sinks, stop.clone())
        .await
        .expect("receivers start");
    let url = format!("http://{}/v1/metrics", running.http_addr());
    let client = reqwest::Client::new();

    let before = peak_rss_kib();
    let response = client
        .post(&url)
        .header(CONTENT_TYPE, "application/x-protobuf")
        .header(CONTENT_ENCODING, "gzip")
        .body(bomb)
        .send()
        .await
        .expect("an answer");
    let after = peak_rss_kib();
    // The limit allows one 4 MiB buffer; inflating the bomb would take 1 GiB.
    let grown_mib = after.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 32,
        "peak RSS grew by {grown_mib} MiB ({before} → {after} KiB)"
    );
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // The receiver is still there for honest requests (an empty one is valid).
    let response = client
        .post(&url)
        .header(CONTENT_TYPE, "application/x-protobuf")
        .body(Vec::new())
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(batches.try_recv().is_err(), "nothing was delivered");

    stop.cancel();
    running.stopped().await.expect("the receivers stop cleanly");
}

//! Active probes: an HTTP GET or a TCP connect to the application every
//! `interval`, timed. A frozen process cannot export metrics, but it can
//! still fail to answer.

use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and how to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// `tcp://host:port`: the connection is the answer.
    Tcp { address: String },
    /// `http://host:port/path`: a 2xx or 3xx status is the answer.
    Http {
        address: String,
        host: String,
        path: String,
    },
}

impl ProbeTarget {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(address) = url.strip_prefix("tcp://") {
            return Ok(ProbeTarget::Tcp {
                address: address.trim_end_matches('/').to_string(),
            });
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("probe {url:?}: use http://host:port/path or tcp://host:port (https is not supported)"))?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("probe {url:?}: no host"));
        }
        let address = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(ProbeTarget::Http {
            address,
            host: authority.to_string(),
            path: path.to_string(),
        })
    }

    /// Probes once. `Ok(latency)` when answered, `Err(reason)` when not
    /// (a timeout after `patience` included).
    pub async fn probe(&self, patience: Duration) -> (SystemTime, Result<Duration, String>) {
        let at = SystemTime::now();
        let started = Instant::now();
        let outcome = match tokio::time::timeout(patience, self.exchange()).await {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(patience)
            )),
        };
        (at, outcome)
    }

    async fn exchange(&self) -> Result<(), String> {
        match self {
            ProbeTarget::Tcp { address } => TcpStream::connect(address)
                .await
                .map(drop)
                .map_err(|err| format!("connect {address}: {err}")),
            ProbeTarget::Http {
                address,
                host,
                path,
            } => {
                let mut stream = TcpStream::connect(address)
                    .await
                    .map_err(|err| format!("connect {address}: {err}"))?;
                let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: freezeframe\r\nConnection: close\r\n\r\n");
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|err| format!("send to {address}: {err}"))?;
                // The status line is all we need; read until it is complete.
                let mut head = Vec::with_capacity(64);
                let mut buffer = [0u8; 256];
                while !head.contains(&b'\n') && head.len() < 4096 {
                    let read = stream
                        .read(&mut buffer)
                        .await
                        .map_err(|err| format!("read from {address}: {err}"))?;
                    if read == 0 {
                        break;
                    }
                    head.extend_from_slice(&buffer[..read]);
                }
                let status_line = String::from_utf8_lossy(&head);
                let status = status_line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|code| code.parse::<u16>().ok());
                match status {
                    Some(code) if (200..400).contains(&code) => Ok(()),
                    Some(code) => Err(format!("GET {path} answered {code}")),
                    None => Err(format!("GET {path}: no HTTP status in the answer")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn probe_urls_parse() {
        assert_eq!(
            ProbeTarget::parse("http://127.0.0.1:8080/health").unwrap(),
            ProbeTarget::Http {
                address: "127.0.0.1:8080".into(),
                host: "127.0.0.1:8080".into(),
                path: "/health".into()
            }
        );
        assert_eq!(
            ProbeTarget::parse("http://db").unwrap(),
            ProbeTarget::Http {
                address: "db:80".into(),
                host: "db".into(),
                path: "/".into()
            }
        );
        assert_eq!(
            ProbeTarget::parse("tcp://127.0.0.1:5432").unwrap(),
            ProbeTarget::Tcp {
                address: "127.0.0.1:5432".into()
            }
        );
        assert!(ProbeTarget::parse("https://x")
            .unwrap_err()
            .contains("https is not supported"));
        assert!(ProbeTarget::parse("http:///x")
            .unwrap_err()
            .contains("no host"));
    }

    #[tokio::test]
    async fn a_healthy_endpoint_answers_and_a_silent_one_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // First connection answers 200; the second is accepted and ignored.
            let (mut healthy, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 512];
            let _ = healthy.read(&mut request).await.unwrap();
            healthy
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let (silent, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(silent);
        });
        let target = ProbeTarget::parse(&format!("http://{address}/health")).unwrap();
        let (_, answered) = target.probe(Duration::from_secs(1)).await;
        assert!(answered.is_ok(), "{answered:?}");
        let (_, silent) = target.probe(Duration::from_millis(200)).await;
        assert!(silent.unwrap_err().contains("no answer within 200ms"));
        server.abort();
    }
}

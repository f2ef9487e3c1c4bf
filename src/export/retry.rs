//! Whether, and when, to try an export again: one pure decision per
//! answer, and an exponential backoff with jitter.
//!
//! The classification is the OTLP specification's: HTTP 429 and 503 retry
//! after the server's `Retry-After`, 502 and 504 retry, every other status
//! is final; gRPC `UNAVAILABLE`, `CANCELLED`, `DEADLINE_EXCEEDED`,
//! `ABORTED`, `OUT_OF_RANGE` and `DATA_LOSS` retry, `RESOURCE_EXHAUSTED`
//! retries only when the server says when (`RetryInfo`), the rest are
//! final. A request that never got an answer (connection refused, timeout)
//! is retried.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

use prost::Message;

/// What to do after an answer that was not a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again; after this long if the server said, else after a backoff.
    Retry { after: Option<Duration> },
    /// Retrying cannot help: the request is dropped.
    Final,
}

/// A server's `Retry-After` is honoured up to this; beyond it we retry
/// sooner rather than hold the queue for hours on one header.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The verdict on an HTTP status that is not 2xx. `retry_after` is the
/// header's value, if any; `now` dates an HTTP-date form.
pub fn classify_http(status: u16, retry_after: Option<&str>, now: SystemTime) -> Verdict {
    match status {
        429 | 503 => Verdict::Retry {
            after: retry_after.and_then(|value| parse_retry_after(value, now)),
        },
        502 | 504 => Verdict::Retry { after: None },
        _ => Verdict::Final,
    }
}

/// The verdict on a gRPC status that is not OK; `retry_delay` is the
/// `google.rpc.RetryInfo` the server attached, if any.
pub fn classify_grpc(code: tonic::Code, retry_delay: Option<Duration>) -> Verdict {
    use tonic::Code;
    match code {
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::DataLoss => Verdict::Retry {
            after: retry_delay.map(|delay| delay.min(MAX_RETRY_AFTER)),
        },
        Code::ResourceExhausted => match retry_delay {
            Some(delay) => Verdict::Retry {
                after: Some(delay.min(MAX_RETRY_AFTER)),
            },
            None => Verdict::Final,
        },
        _ => Verdict::Final,
    }
}

/// `Retry-After` as delta-seconds or as an HTTP-date (RFC 9110), capped at
/// [`MAX_RETRY_AFTER`]; a date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => parse_http_date(value)?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The IMF-fixdate form, `Sun, 06 Nov 1994 08:49:37 GMT`: the one RFC 9110
/// says senders must use.
fn parse_http_date(text: &str) -> Option<SystemTime> {
    let (_weekday, rest) = text.split_once(", ")?;
    let mut fields = rest.split(' ');
    let day: u64 = fields.next()?.parse().ok()?;
    let month = fields.next()?;
    let year: u64 = fields.next()?.parse().ok()?;
    let clock = fields.next()?;
    if fields.next()? != "GMT" || fields.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|name| *name == month)? as u64 + 1;
    let mut clock = clock.split(':').map(|part| part.parse::<u64>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    if clock.next().is_some() || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm), for years from 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 {
        return None;
    }
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).checked_sub(719_468)
}

/// `google.rpc.Status`, as carried in `grpc-status-details-bin`; only what
/// finding a `RetryInfo` needs.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
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

const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The delay of a `google.rpc.RetryInfo` in a gRPC status's details.
pub fn grpc_retry_delay(status_details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(status_details).ok()?;
    let info = status
        .details
        .iter()
        .find(|detail| detail.type_url == RETRY_INFO_TYPE)?;
    let delay = RetryInfo::decode(info.value.as_slice()).ok()?.retry_delay?;
    let seconds = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos).ok()?;
    Some(Duration::new(seconds, nanos.min(999_999_999)))
}

/// Exponential backoff: `initial`, doubling per failed attempt up to `max`,
/// with "equal jitter" (half fixed, half random) so that sidecars which
/// lost the same backend do not come back in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0 for the first retry), for a
    /// `jitter` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        ceiling / 2 + ceiling.mul_f64(jitter / 2.0)
    }
}

/// A fraction in `[0, 1)` that differs between calls and processes; all
/// jitter needs, without a random-number crate.
pub fn jitter() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch_plus(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn throttling_and_unavailability_retry_when_the_server_says() {
        let now = epoch_plus(0);
        for status in [429, 503] {
            assert_eq!(
                classify_http(status, Some("7"), now),
                Verdict::Retry {
                    after: Some(Duration::from_secs(7))
                }
            );
            assert_eq!(
                classify_http(status, None, now),
                Verdict::Retry { after: None }
            );
            assert_eq!(
                classify_http(status, Some("soon"), now),
                Verdict::Retry { after: None },
                "a header we cannot read falls back to the backoff"
            );
        }
    }

    #[test]
    fn gateway_errors_retry_with_backoff() {
        for status in [502, 504] {
            assert_eq!(
                classify_http(status, Some("7"), epoch_plus(0)),
                Verdict::Retry { after: None }
            );
        }
    }

    #[test]
    fn other_statuses_are_final() {
        for status in [400, 401, 403, 404, 405, 408, 413, 415, 500, 501, 505] {
            assert_eq!(
                classify_http(status, Some("1"), epoch_plus(0)),
                Verdict::Final,
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_reads_both_forms_and_is_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_717); // Sun, 06 Nov 1994 08:48:37 GMT
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:40:00 GMT", now),
            Some(Duration::ZERO),
            "a date past is now"
        );
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        for bad in [
            "",
            "-1",
            "1.5",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:00:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(SystemTime::UNIX_EPOCH)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(epoch_plus(1_835_438_400))
        );
    }

    #[test]
    fn grpc_codes_follow_the_otlp_specification() {
        use tonic::Code;
        for code in [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert_eq!(
                classify_grpc(code, None),
                Verdict::Retry { after: None },
                "{code:?}"
            );
        }
        assert_eq!(
            classify_grpc(Code::Unavailable, Some(Duration::from_secs(3))),
            Verdict::Retry {
                after: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(classify_grpc(Code::ResourceExhausted, None), Verdict::Final);
        assert_eq!(
            classify_grpc(Code::ResourceExhausted, Some(Duration::from_secs(2))),
            Verdict::Retry {
                after: Some(Duration::from_secs(2))
            }
        );
        for code in [
            Code::InvalidArgument,
            Code::Unimplemented,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Internal,
            Code::Unknown,
            Code::FailedPrecondition,
            Code::AlreadyExists,
        ] {
            assert_eq!(classify_grpc(code, None), Verdict::Final, "{code:?}");
        }
    }

    #[test]
    fn retry_info_is_found_in_status_details() {
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: 4,
                nanos: 500_000_000,
            }),
        };
        let status = RpcStatus {
            details: vec![
                ProtoAny {
                    type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                    value: vec![1, 2, 3],
                },
                ProtoAny {
                    type_url: RETRY_INFO_TYPE.into(),
                    value: info.encode_to_vec(),
                },
            ],
        };
        assert_eq!(
            grpc_retry_delay(&status.encode_to_vec()),
            Some(Duration::from_millis(4500))
        );
        assert_eq!(
            grpc_retry_delay(&RpcStatus::default().encode_to_vec()),
            None
        );
        assert_eq!(grpc_retry_delay(b"\xff\xff garbage"), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling_with_bounded_jitter() {
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        assert_eq!(backoff.delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff.delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff.delay(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff.delay(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff.delay(10, 1.0), Duration::from_secs(30));
        assert_eq!(backoff.delay(u32::MAX, 0.5), Duration::from_millis(22_500));
        for _ in 0..100 {
            let fraction = jitter();
            assert!((0.0..1.0).contains(&fraction));
        }
        assert_ne!(jitter(), jitter());
    }
}

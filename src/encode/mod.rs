//! Encoders: every output format is a pure function of one [`Profile`].
//!
//! - [`pprof`]: gzipped `profile.proto`, for `go tool pprof`, Pyroscope and
//!   the OTLP `original_payload`; it also decodes, for `freezeframe report`.
//! - [`folded`]: Brendan Gregg's folded stacks, for flamegraph tooling.
//! - [`flamegraph`]: an interactive SVG drawn from the folded stacks.
//! - [`otlp`]: an OTLP profiles export request, for Pyroscope and the
//!   OpenTelemetry Collector.
//! - [`pyroscope`]: a Pyroscope push request, series of pprofs.
//! - [`trace`]: the capture as an OTLP span, for a trace view.
//!
//! [`Profile`]: crate::profile::Profile

use std::io;

use crate::profile::ProfileKind;

pub mod flamegraph;
pub mod folded;
pub mod otlp;
pub mod pprof;
pub mod pyroscope;
pub mod trace;

/// Why a profile could not be encoded, or a saved pprof could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot decompress the pprof: the gzip stream is corrupt or truncated")]
    Gzip(#[source] io::Error),

    #[error(
        "the pprof decompresses to more than {limit_bytes} bytes; refusing to read it \
         (a corrupt file or a gzip bomb)"
    )]
    TooLarge { limit_bytes: u64 },

    #[error(
        "not a pprof profile: the bytes are neither gzip nor a profile.proto message; \
         pass a .pb.gz written by freezeframe or go tool pprof"
    )]
    Protobuf(#[source] prost::DecodeError),

    #[error(
        "the pprof's sample types ({found}) are not those of a profile freezeframe writes \
         (off_cpu/nanoseconds or alloc_space/bytes); pass a .pb.gz written by freezeframe"
    )]
    UnknownSampleTypes { found: String },

    #[error(
        "the pprof has no `{type_name}/{unit}` sample type, which its kind of profile needs; \
         pass a .pb.gz written by freezeframe"
    )]
    MissingSampleType {
        type_name: &'static str,
        unit: &'static str,
    },

    #[error("the pprof refers to {table} id {id}, which it never defines; the file is corrupt")]
    UnknownId { table: &'static str, id: u64 },

    #[error("the pprof refers to string {index}, outside its string table; the file is corrupt")]
    UnknownString { index: i64 },

    #[error(
        "a pprof sample has {found} values but the profile declares {expected} sample types; \
         the file is corrupt"
    )]
    ValueCount { expected: usize, found: usize },

    #[error("the pprof field `{field}` holds {value}, which is out of range; the file is corrupt")]
    OutOfRange { field: &'static str, value: i64 },

    #[error("cannot draw a flamegraph: {}", nothing_to_draw(*kind))]
    NothingToDraw { kind: ProfileKind },

    #[error("cannot draw the flamegraph")]
    Flamegraph(#[source] io::Error),
}

/// Why a profile of `kind` has nothing to draw, and what to do about it.
fn nothing_to_draw(kind: ProfileKind) -> &'static str {
    match kind {
        ProfileKind::OffCpu => {
            "the profile holds no stack blocked for 1 µs or more; \
             capture for longer or lower --min-block"
        }
        ProfileKind::AddressSpace => {
            "the profile holds no address-space change; \
             no thread mapped or unmapped enough memory during the capture"
        }
    }
}

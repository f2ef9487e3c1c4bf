//! Request bodies taken in under a hard size limit, decompressed as they
//! arrive.
//!
//! The limit holds for the bytes on the wire *and* for what they decompress
//! to, and it is enforced as each chunk arrives: a gzip bomb is refused after
//! the first `limit` bytes it inflates to, having cost no more memory than
//! that.

use std::io::{self, Write};

use flate2::write::MultiGzDecoder;

/// How a body is encoded on the wire (HTTP `Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Identity,
    Gzip,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body is larger than max_request_bytes ({limit} bytes){}", when_inflated(*.inflated))]
    TooLarge { limit: usize, inflated: bool },
    #[error("the request body is not valid gzip: {0}")]
    Corrupt(io::Error),
}

fn when_inflated(inflated: bool) -> &'static str {
    if inflated {
        " once decompressed"
    } else {
        ""
    }
}

/// A body being received, chunk by chunk.
pub(crate) struct LimitedBody {
    limit: usize,
    received: usize,
    sink: Sink,
}

enum Sink {
    Identity(Capped),
    Gzip(Box<MultiGzDecoder<Capped>>),
}

impl LimitedBody {
    /// `expected_len` (from `Content-Length`) only sizes the first allocation.
    pub fn new(compression: Compression, limit: usize, expected_len: Option<u64>) -> Self {
        let sink = match compression {
            Compression::Identity => {
                let expected = expected_len
                    .and_then(|len| usize::try_from(len).ok())
                    .unwrap_or(0);
                Sink::Identity(Capped::with_capacity(limit, expected))
            }
            Compression::Gzip => Sink::Gzip(Box::new(MultiGzDecoder::new(Capped::with_capacity(
                limit, 0,
            )))),
        };
        Self {
            limit,
            received: 0,
            sink,
        }
    }

    /// Takes the next chunk from the wire.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        self.received = self.received.saturating_add(chunk.len());
        if self.received > self.limit {
            return Err(BodyError::TooLarge {
                limit: self.limit,
                inflated: false,
            });
        }
        match &mut self.sink {
            Sink::Identity(capped) => capped.append(chunk),
            Sink::Gzip(decoder) => {
                let written = decoder.write_all(chunk);
                inflate_result(decoder.get_ref(), written)
            }
        }
    }

    /// The whole body, decompressed.
    pub fn finish(self) -> Result<Vec<u8>, BodyError> {
        match self.sink {
            Sink::Identity(capped) => Ok(capped.bytes),
            Sink::Gzip(mut decoder) => {
                // Finishing checks the gzip trailer and flushes what is left.
                let finished = decoder.try_finish();
                inflate_result(decoder.get_ref(), finished)?;
                Ok(std::mem::take(&mut decoder.get_mut().bytes))
            }
        }
    }
}

/// The decoder reports a full output buffer as an I/O error; tell it apart
/// from corrupt input.
fn inflate_result(capped: &Capped, result: io::Result<()>) -> Result<(), BodyError> {
    match result {
        Ok(()) => Ok(()),
        Err(_) if capped.exceeded => Err(BodyError::TooLarge {
            limit: capped.limit,
            inflated: true,
        }),
        Err(error) => Err(BodyError::Corrupt(error)),
    }
}

/// A byte buffer that refuses to grow past `limit`, capacity included.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl Capped {
    fn with_capacity(limit: usize, expected: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(expected.min(limit)),
            limit,
            exceeded: false,
        }
    }

    fn append(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        let needed = self.bytes.len().saturating_add(chunk.len());
        if needed > self.limit {
            self.exceeded = true;
            return Err(BodyError::TooLarge {
                limit: self.limit,
                inflated: false,
            });
        }
        if needed > self.bytes.capacity() {
            // Grow geometrically, but never past the limit: a plain `Vec`
            // could double to almost twice the limit.
            let target = needed
                .max(self.bytes.capacity().saturating_mul(2))
                .min(self.limit);
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }
}

impl Write for Capped {
    fn write(&mut self, chunk: &[u8]) -> io::Result<usize> {
        match self.append(chunk) {
            Ok(()) => Ok(chunk.len()),
            Err(_) => Err(io::Error::other("decompressed body exceeds the size limit")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(bytes)
            .expect("writing to a Vec cannot fail");
        encoder.finish().expect("writing to a Vec cannot fail")
    }

    fn receive(
        compression: Compression,
        limit: usize,
        wire: &[u8],
        chunk: usize,
    ) -> Result<Vec<u8>, BodyError> {
        let mut body = LimitedBody::new(compression, limit, Some(wire.len() as u64));
        for piece in wire.chunks(chunk) {
            body.push(piece)?;
        }
        body.finish()
    }

    #[test]
    fn plain_bodies_up_to_the_limit_pass_whole() {
        let payload = vec![7_u8; 1000];
        assert_eq!(
            receive(Compression::Identity, 1000, &payload, 64).expect("at the limit"),
            payload
        );
        assert!(matches!(
            receive(Compression::Identity, 999, &payload, 64),
            Err(BodyError::TooLarge {
                limit: 999,
                inflated: false
            })
        ));
    }

    #[test]
    fn gzip_bodies_are_inflated_across_chunk_boundaries() {
        let payload: Vec<u8> = (0..50_000_u32).flat_map(|n| n.to_le_bytes()).collect();
        let wire = gzip(&payload);
        for chunk in [1, 7, 4096, wire.len()] {
            assert_eq!(
                receive(Compression::Gzip, payload.len(), &wire, chunk).expect("fits"),
                payload
            );
        }
    }

    #[test]
    fn concatenated_gzip_members_are_one_body() {
        let mut wire = gzip(b"first ");
        wire.extend(gzip(b"second"));
        assert_eq!(
            receive(Compression::Gzip, 100, &wire, 5).expect("fits"),
            b"first second"
        );
    }

    #[test]
    fn a_body_that_inflates_past_the_limit_is_refused_early_without_growing_past_it() {
        let wire = gzip(&vec![0_u8; 8 << 20]);
        let limit = 64 << 10;
        let mut body = LimitedBody::new(Compression::Gzip, limit, None);
        let mut pushed = 0;
        let refusal = wire
            .chunks(256)
            .find_map(|piece| {
                pushed += piece.len();
                body.push(piece).err()
            })
            .expect("the limit must trip");
        assert!(
            matches!(refusal, BodyError::TooLarge { inflated: true, .. }),
            "{refusal}"
        );
        assert!(
            pushed < wire.len() / 2,
            "refused only after {pushed} of {} bytes",
            wire.len()
        );
        if let Sink::Gzip(decoder) = &body.sink {
            assert!(decoder.get_ref().bytes.capacity() <= limit);
        }
    }

    #[test]
    fn truncated_or_foreign_gzip_is_corrupt() {
        let wire = gzip(b"some protobuf");
        let truncated = &wire[..wire.len() - 4];
        assert!(matches!(
            receive(Compression::Gzip, 100, truncated, 3),
            Err(BodyError::Corrupt(_))
        ));
        assert!(matches!(
            receive(Compression::Gzip, 100, b"not gzip at all", 3),
            Err(BodyError::Corrupt(_))
        ));
        assert!(matches!(
            receive(Compression::Gzip, 100, b"", 3),
            Err(BodyError::Corrupt(_))
        ));
    }
}

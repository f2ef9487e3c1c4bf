//! One clock for the whole run: monotonic instants for measuring, mapped
//! onto Unix time for the report (and for matching spans and captures).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    epoch_unix_ns: u64,
}

impl Clock {
    pub fn start() -> Self {
        let epoch = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            epoch,
            epoch_unix_ns: crate::format::ns(unix),
        }
    }

    /// Nanoseconds from the epoch to `at` (0 for an instant before it).
    pub fn since_epoch_ns(&self, at: Instant) -> u64 {
        crate::format::ns(at.saturating_duration_since(self.epoch))
    }

    /// Unix time, in nanoseconds, of an offset from the epoch.
    pub fn unix_ns(&self, since_epoch_ns: u64) -> u64 {
        self.epoch_unix_ns + since_epoch_ns
    }

    /// `at` as the prefix of a printed line: seconds since the start.
    pub fn stamp(&self, at: Instant) -> String {
        format!(
            "[{:8.3} s]",
            at.saturating_duration_since(self.epoch).as_secs_f64()
        )
    }
}

//! Figures as people read them.

use std::time::Duration;

/// Whole nanoseconds, saturating.
pub fn ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pub fn duration(duration: Duration) -> String {
    nanos(ns(duration))
}

pub fn nanos(ns: u64) -> String {
    let seconds = ns as f64 / 1e9;
    if seconds >= 1.0 {
        format!("{seconds:.3} s")
    } else if seconds >= 1e-3 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{:.0} µs", seconds * 1e6)
    }
}

pub fn bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let value = bytes as f64;
    if value >= KIB * KIB * KIB {
        format!("{:.2} GiB", value / (KIB * KIB * KIB))
    } else if value >= KIB * KIB {
        format!("{:.1} MiB", value / (KIB * KIB))
    } else if value >= KIB {
        format!("{:.1} KiB", value / KIB)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable() {
        assert_eq!(nanos(1_234_000_000), "1.234 s");
        assert_eq!(nanos(412_345_678), "412.3 ms");
        assert_eq!(nanos(75_400), "75 µs");
        assert_eq!(bytes((1 << 30) + (1 << 26) + 16), "1.06 GiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }
}

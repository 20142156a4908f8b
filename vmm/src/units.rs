//! Sizes and durations as people write them on the command line, in config files
//! and in control requests (`512M`, `2G`, `500ms`), and back.
//!
//! One reading of a size for the whole VMM: binary units (`M` is 2^20 bytes), so that
//! a size given to `--mem`, `--limit`, `ctl balloon set` and `--tps rate=` means the
//! same thing everywhere.

use std::time::Duration;

/// A size or a duration that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// Not a size.
    #[error("bad size {0:?}: expected a number with an optional K, M, G or T suffix")]
    BadSize(String),
    /// A size beyond 64 bits.
    #[error("size {0:?} is too large")]
    SizeTooLarge(String),
    /// Not a duration.
    #[error("bad duration {0:?}: expected e.g. 500ms, 2s or 1m")]
    BadDuration(String),
}

/// Parses `512M`, `2G`, `4096`, `64K` (binary units; `B`/`iB` suffixes accepted).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| UnitError::BadSize(text.to_string()))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| UnitError::SizeTooLarge(text.to_string()))
}

/// Formats a byte count the way [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses `500ms`, `2s`, `1m`, `250us` (a plain number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let t = text.trim();
    let bad = || UnitError::BadDuration(text.to_string());
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len()));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(4097), "4097");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
    }
}

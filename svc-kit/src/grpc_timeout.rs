//! The `grpc-timeout` header: read as the gRPC spec bounds it, and written.
//!
//! The value is at most 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`,
//! `n`), so no unit can overflow a `Duration`.

use std::time::Duration;

pub const HEADER: &str = "grpc-timeout";

/// The duration of a header value (e.g. `500m`, `5S`); anything else is
/// `None` (no deadline).
pub fn parse(value: &str) -> Option<Duration> {
    // Checked, not `split_at`: a last character of more than one byte would
    // panic there (the fuzz tests found it).
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The header value for `timeout`, in the finest unit that fits 8 digits
/// (rounded down: a deadline sent must never be later than the real one).
pub fn format(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    for (per, unit) in [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
    ] {
        if nanos / per <= MAX {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{}H", (nanos / 3_600_000_000_000).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_as_the_spec_bounds_them() {
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("500m"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        // More than 8 digits: not a valid header, and no overflow.
        assert_eq!(parse("99999999999999999H"), None);
        assert_eq!(parse("123456789m"), None);
        assert_eq!(parse("+5S"), None);
        assert_eq!(parse("S"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("5ß"), None);
    }

    #[test]
    fn writes_the_finest_unit_that_fits_and_reads_back_no_later() {
        assert_eq!(format(Duration::from_millis(1)), "1000000n");
        assert_eq!(format(Duration::from_millis(500)), "500000u");
        assert_eq!(format(Duration::from_secs(5)), "5000000u");
        assert_eq!(format(Duration::from_secs(3600)), "3600000m");
        for timeout in [
            Duration::from_nanos(1),
            Duration::from_micros(123_456_789),
            Duration::from_secs(86_400 * 365),
            Duration::MAX,
        ] {
            let back = parse(&format(timeout)).unwrap();
            assert!(back <= timeout, "{timeout:?} came back as {back:?}");
        }
    }
}

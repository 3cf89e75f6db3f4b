//! Human durations in configuration: `500ms`, `10s`, `5m`, `2h`, `7d`.

use std::time::Duration;

/// A duration string we cannot read.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a duration; write a number and a unit: ms, s, m, h or d (e.g. `500ms`, `7d`)"
)]
pub struct DurationError(String);

/// Parses `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| DurationError(s.into()))?;
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| DurationError(s.into()))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(DurationError(s.into())),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(|| DurationError(s.into()))
}

/// Writes a duration the way configuration reads it: `7d`, `15s`, `500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(86_400_000) && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

pub mod serde_duration {
    //! `Duration` as a human string in TOML and JSON: `#[serde(with = "weir_core::serde_duration")]`.
    use std::time::Duration;

    /// Writes `15s`, `500ms`, `7d`.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Reads what [`parse_duration`](super::parse_duration) reads.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("7 weeks").is_err());
        assert!(parse_duration("").is_err());
    }
}

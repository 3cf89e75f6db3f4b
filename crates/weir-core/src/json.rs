//! JSON numbers with every digit: what the workspace's serde_json feature
//! `arbitrary_precision` changes, and the two helpers that keep it from surprising anyone.
//!
//! Every JSON value weir reads or writes on the way from the WAL to the log, the API and the
//! channels keeps the text of its numbers (`123456789012345678901234567890` is not rounded
//! to an `f64`). Two consequences, each handled here:
//!
//! - Equality of [`Value`]s compares numbers as written: `1.50 != 1.5`, `1e2 != 100`.
//!   [`same_number`] compares them by value, as `jsonb` does (payload selectors use it).
//! - A number that is not an integer reaches serde's buffered deserialization (`Content`:
//!   `#[serde(untagged)]`, `#[serde(flatten)]`, internally tagged enums `#[serde(tag = …)]`)
//!   as a map, so an `f64` field there refuses it (serde-rs/json#505, #721), and an integer of
//!   65 to 128 bits as a `u128`/`i128`, which the buffer refuses even for a `Value` field.
//!   weir's own types avoid those attributes; user types (job args) go through [`from_value`],
//!   which falls back to the numbers an `f64` holds exactly. Nothing is ever rounded: what
//!   cannot be read exactly is an error naming the type.
//!
//! ```text
//! WAL text ─► weir_source::cast (json, jsonb: serde_json, digits kept) ─► weir.events (jsonb)
//!   ─► LogReader / GET /v1/log / SSE & WebSocket / sinks (serde_json writes the digits back)
//! ```

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

/// Whether `a` and `b` are the same number, compared by value with every digit (`1.50` and
/// `1.5`, `1e2` and `100`, `-0` and `0`), as `jsonb` compares them.
pub fn same_number(a: &Number, b: &Number) -> bool {
    match (decimal(a.as_str()), decimal(b.as_str())) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

/// A JSON number as `(negative, digits, point)`, its value `±0.digits × 10^point`, the digits
/// without leading or trailing zeros (zero is `(false, "", 0)`); `None` for an exponent beyond
/// `i64`.
fn decimal(n: &str) -> Option<(bool, String, i64)> {
    let (negative, n) = match n.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, n),
    };
    let (mantissa, exponent) = match n.find(['e', 'E']) {
        Some(at) => (&n[..at], n[at + 1..].parse::<i64>().ok()?),
        None => (n, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let significant = digits.trim_start_matches('0');
    let point = (int.len() as i64)
        .checked_add(exponent)?
        .checked_sub((digits.len() - significant.len()) as i64)?;
    let significant = significant.trim_end_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    Some((negative, significant.to_string(), point))
}

/// `serde_json::from_value`, for user types that may buffer (`untagged`, `flatten`,
/// `tag = …`): when the value as written does not deserialize and some of its numbers are
/// written otherwise than an `f64` would write them (`1.50`, `1e2`, `2.50e-3`), tries again
/// with those numbers rewritten as the `f64` writes them — only numbers the `f64` holds
/// exactly, so nothing is ever rounded; the first error is the answer when that fails too.
pub fn from_value<T: DeserializeOwned>(value: Value) -> serde_json::Result<T> {
    let mut rewritten = value.clone();
    if !as_f64_writes(&mut rewritten) {
        return serde_json::from_value(value);
    }
    serde_json::from_value(value).or_else(|first| serde_json::from_value(rewritten).or(Err(first)))
}

/// Rewrites in place every non-integer number that an `f64` holds exactly into the `f64`'s
/// own text; whether any changed.
fn as_f64_writes(value: &mut Value) -> bool {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            let exact = n.as_f64().and_then(Number::from_f64).filter(|f| same_number(f, n));
            match exact {
                Some(f) if f.as_str() != n.as_str() => {
                    *n = f;
                    true
                }
                _ => false,
            }
        }
        Value::Array(items) => items.iter_mut().fold(false, |any, v| as_f64_writes(v) | any),
        Value::Object(fields) => fields.values_mut().fold(false, |any, v| as_f64_writes(v) | any),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn n(text: &str) -> Number {
        text.parse().unwrap()
    }

    #[test]
    fn numbers_compare_by_value_with_every_digit() {
        for (a, b) in [
            ("1.5", "1.50"),
            ("100", "1e2"),
            ("100", "1.00E+2"),
            ("0.001", "1e-3"),
            ("-0", "0.0e7"),
            ("123456789012345678901234567890", "1.2345678901234567890123456789e29"),
        ] {
            assert!(same_number(&n(a), &n(b)), "{a} {b}");
        }
        for (a, b) in [
            ("1", "10"),
            ("-1", "1"),
            ("0.1", "0.1000000000000000000000000001"),
            ("123456789012345678901234567890", "123456789012345678901234567891"),
        ] {
            assert!(!same_number(&n(a), &n(b)), "{a} {b}");
        }
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(tag = "do", rename_all = "snake_case")]
    enum Task {
        Scale { by: f64, label: Option<String> },
        Keep { raw: Value },
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(untagged)]
    enum Amount {
        Number(f64),
        Words(String),
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Outer {
        id: u64,
        #[serde(flatten)]
        inner: Inner,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Inner {
        ratio: f64,
    }

    /// Numbers as `jsonb` writes them back (`1.50` stays `1.50`) reach buffered user types.
    #[test]
    fn buffered_user_types_get_their_numbers() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        // Plain serde_json refuses: the reason this helper exists.
        assert!(serde_json::from_value::<Task>(v(r#"{"do": "scale", "by": 1.50}"#)).is_err());
        for text in [r#"{"do": "scale", "by": 1.50}"#, r#"{"do": "scale", "by": 15e-1}"#] {
            assert_eq!(
                from_value::<Task>(v(text)).unwrap(),
                Task::Scale { by: 1.5, label: None },
                "{text}"
            );
        }
        assert_eq!(from_value::<Amount>(v("2.50")).unwrap(), Amount::Number(2.5));
        assert_eq!(
            from_value::<Outer>(v(r#"{"id": 7, "ratio": 0.250}"#)).unwrap(),
            Outer { id: 7, inner: Inner { ratio: 0.25 } }
        );
        // A value kept as JSON keeps every digit.
        let big = "1234567890123456789012345678901234567890";
        let Task::Keep { raw } = from_value::<Task>(v(&format!(
            r#"{{"do": "keep", "raw": [{big}, 1.50, 0.1000000000000000000000000001]}}"#
        )))
        .unwrap() else {
            panic!("keep");
        };
        assert_eq!(raw.to_string(), format!("[{big},1.50,0.1000000000000000000000000001]"));
        // An integer of 65 to 128 bits reaches serde's buffer as a u128, which it cannot hold:
        // refused with the reason, never rounded.
        let err = from_value::<Task>(v(r#"{"do": "keep", "raw": 123456789012345678901234567890}"#))
            .unwrap_err();
        assert!(err.to_string().contains("u128"), "{err}");
        // What an f64 cannot hold is never rounded into one: the error stands.
        let err = from_value::<Task>(v(r#"{"do": "scale", "by": 0.1000000000000000000000000001}"#))
            .unwrap_err();
        assert!(err.to_string().contains("expected f64"), "{err}");
    }
}

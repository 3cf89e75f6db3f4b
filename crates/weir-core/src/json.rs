//! JSON numbers with every digit: what the workspace's serde_json feature
//! `arbitrary_precision` changes, and the helpers that keep it from surprising anyone.
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
//! - JSON Schema's `integer` admits `2.0`, serde's integers do not: the API's bodies go
//!   through [`from_value_whole`], which reads whole numbers however written where an integer
//!   is asked and leaves every other number as written.
//!
//! ```text
//! WAL text ─► weir_source::cast (json, jsonb: serde_json, digits kept) ─► weir.events (jsonb)
//!   ─► LogReader / GET /v1/log / SSE & WebSocket / sinks (serde_json writes the digits back)
//! ```

use serde::de::{DeserializeOwned, Visitor};
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

/// `serde_json::from_value` that reads a whole number written with a fraction or an exponent
/// (`2.0`, `1e3`, `150e-1`) where the type asks for an integer, as JSON Schema's `integer`
/// admits (the API's documents say `integer`; a client that writes every number as a float
/// is within them). Only where an integer is asked: `2.5` is still refused, and a `Value` or
/// an `f64` reads the number as written.
pub fn from_value_whole<T: DeserializeOwned>(value: Value) -> serde_json::Result<T> {
    T::deserialize(Whole(value))
}

/// `n` as an `i64` when it is a whole number in range, however it is written (`2`, `2.0`,
/// `2e0`), as JSON Schema's `integer` reads it.
pub fn whole_i64(n: &Number) -> Option<i64> {
    n.as_i64().or_else(|| whole(n)?.as_i64())
}

/// `n` written as an integer when it is one; `None` when it has a fraction or more than 39
/// digits (beyond `u128`, no integer type reads it anyway).
fn whole(n: &Number) -> Option<Number> {
    let (negative, digits, point) = decimal(n.as_str())?;
    if digits.is_empty() {
        return Some(Number::from(0));
    }
    let zeros = usize::try_from(point).ok()?.checked_sub(digits.len())?;
    if digits.len() + zeros > 39 {
        return None;
    }
    let sign = if negative { "-" } else { "" };
    format!("{sign}{digits}{}", "0".repeat(zeros)).parse().ok()
}

/// A [`Value`] as a deserializer that gives integers to integer fields when the number is
/// whole, and otherwise deserializes as the `Value` itself would.
struct Whole(Value);

impl<'de> serde::de::IntoDeserializer<'de, serde_json::Error> for Whole {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

/// Integer requests read a whole number as the integer it is (see [`visit_whole`]).
macro_rules! whole_integers {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
            match self.0 {
                Value::Number(n) => visit_whole(&n, visitor),
                other => other.$method(visitor),
            }
        }
    )*};
}

/// `n` to an integer visitor when it is whole, whose range check then speaks
/// (`invalid value: integer 5000000000, expected u32`); any other number is refused naming it
/// (serde_json's numbers with `arbitrary_precision` would say only "invalid number").
fn visit_whole<'de, V: Visitor<'de>>(n: &Number, visitor: V) -> serde_json::Result<V::Value> {
    let text = whole(n).map(|w| w.as_str().to_owned()).unwrap_or_default();
    if let Ok(u) = text.parse::<u64>() {
        visitor.visit_u64(u)
    } else if let Ok(i) = text.parse::<i64>() {
        visitor.visit_i64(i)
    } else if let Ok(u) = text.parse::<u128>() {
        visitor.visit_u128(u)
    } else if let Ok(i) = text.parse::<i128>() {
        visitor.visit_i128(i)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Other(&format!("number {n}")),
            &visitor,
        ))
    }
}

/// Other scalars go to the `Value`'s own method: its `deserialize_any` would hand a number
/// to the visitor as `arbitrary_precision`'s private map.
macro_rules! as_the_value {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
            self.0.$method(visitor)
        }
    )*};
}

/// Containers are visited with their items wrapped, so integers inside them are read alike.
macro_rules! as_any {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
            self.deserialize_any(visitor)
        }
    )*};
}

impl<'de> serde::Deserializer<'de> for Whole {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        use serde::de::value::{MapDeserializer, SeqDeserializer};
        match self.0 {
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(Whole));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(fields) => {
                let mut map =
                    MapDeserializer::new(fields.into_iter().map(|(k, v)| (Text(k), Whole(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        self.0.deserialize_enum(name, variants, visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        self.0.deserialize_unit_struct(name, visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        self.deserialize_any(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        self.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        self.deserialize_any(visitor)
    }

    whole_integers! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }
    as_the_value! {
        deserialize_bool deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_bytes deserialize_byte_buf deserialize_unit
        deserialize_identifier deserialize_ignored_any
    }
    as_any! { deserialize_seq deserialize_map }
}

/// Text pairs (a query string's parameters) as `T`: an integer field takes a whole number
/// however written (`limit=2.0`, `1e3`), as an `integer` parameter schema admits; a `bool`
/// takes `true` or `false`; everything else reads the text, as serde_urlencoded reads it.
pub fn from_text_pairs<T: DeserializeOwned>(
    pairs: impl Iterator<Item = (String, String)>,
) -> serde_json::Result<T> {
    let pairs = pairs.map(|(k, v)| (Text(k), Text(v)));
    T::deserialize(serde::de::value::MapDeserializer::<_, serde_json::Error>::new(pairs))
}

/// A text that may stand for a scalar: a query parameter's value, or an object's key (which
/// serde_json also reads as an integer for a map keyed by one).
struct Text(String);

impl<'de> serde::de::IntoDeserializer<'de, serde_json::Error> for Text {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl Text {
    fn refuse<'de, V: Visitor<'de>, T>(&self, visitor: V) -> serde_json::Result<T> {
        Err(serde::de::Error::invalid_value(serde::de::Unexpected::Str(&self.0), &visitor))
    }
}

/// Integer requests: the text as a JSON number, when it is a whole one.
macro_rules! text_integers {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
            match self.0.parse::<Number>() {
                Ok(n) => visit_whole(&n, visitor),
                Err(_) => self.refuse(visitor),
            }
        }
    )*};
}

impl<'de> serde::Deserializer<'de> for Text {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        visitor.visit_string(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> serde_json::Result<V::Value> {
        visitor
            .visit_enum(serde::de::IntoDeserializer::<serde_json::Error>::into_deserializer(self.0))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self.0.as_str() {
            "true" => visitor.visit_bool(true),
            "false" => visitor.visit_bool(false),
            _ => self.refuse(visitor),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        match self.0.parse::<f64>() {
            Ok(f) => visitor.visit_f64(f),
            Err(_) => self.refuse(visitor),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> serde_json::Result<V::Value> {
        self.deserialize_f64(visitor)
    }

    text_integers! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
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

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        version: i64,
        limit: Option<u32>,
        positions: Vec<i64>,
        nested: Option<Nested>,
        ratio: Option<f64>,
        data: Option<Value>,
        mode: Option<Mode>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Nested {
        size: u8,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    /// JSON Schema's `integer` admits `2.0` and `1e3`: integer fields read them, everything
    /// else reads as plain serde_json would.
    #[test]
    fn whole_numbers_read_as_integers_where_an_integer_is_asked() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let body = from_value_whole::<Body>(v(r#"{"version": 2.0, "limit": 1e3,
            "positions": [1, 2.00, 150e-1, -0.0], "nested": {"size": 2.5e1}, "ratio": 2.0,
            "data": {"amount": 2.0, "big": 123456789012345678901234567890}, "mode": "slow"}"#))
        .unwrap();
        assert_eq!(body.version, 2);
        assert_eq!(body.limit, Some(1000));
        assert_eq!(body.positions, [1, 2, 15, 0]);
        assert_eq!(body.nested, Some(Nested { size: 25 }));
        assert_eq!(body.ratio, Some(2.0));
        assert_eq!(body.mode, Some(Mode::Slow));
        // A payload keeps its numbers as written.
        assert_eq!(
            body.data.unwrap().to_string(),
            r#"{"amount":2.0,"big":123456789012345678901234567890}"#
        );
        let nulls =
            from_value_whole::<Body>(v(r#"{"version": 1, "limit": null, "positions": []}"#));
        assert_eq!(nulls.unwrap().limit, None);
        for (text, want) in [("7", Some(7)), ("7.0", Some(7)), ("70e-1", Some(7)), ("7.5", None)] {
            assert_eq!(whole_i64(&n(text)), want, "{text}");
        }

        // Still refused: a fraction, a number out of range, the wrong type, an unknown field.
        for (text, says) in [
            (r#"{"version": 2.5, "positions": []}"#, "invalid value: number 2.5, expected i64"),
            (r#"{"version": 1, "limit": 5e9, "positions": []}"#, "u32"),
            (r#"{"version": 1e40, "positions": []}"#, "i64"),
            (r#"{"version": "2", "positions": []}"#, "string"),
            (r#"{"version": 1, "positions": [], "nested": {"size": 256.0}}"#, "u8"),
            (r#"{"version": 1, "positions": [], "extra": 1}"#, "unknown field"),
            (r#"{"positions": []}"#, "missing field `version`"),
            (r#"{"version": 1, "positions": [], "mode": "other"}"#, "unknown variant"),
        ] {
            let err = from_value_whole::<Body>(v(text)).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct Params {
        limit: Option<i64>,
        name: Option<String>,
        on: Option<bool>,
        mode: Option<Mode>,
    }

    /// Query parameters: integers take whole numbers however written, text stays as written.
    #[test]
    fn text_pairs_read_whole_numbers_for_integers_only() {
        let pairs = |list: &[(&str, &str)]| {
            list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>().into_iter()
        };
        let p: Params = from_text_pairs(pairs(&[
            ("limit", "2.0"),
            ("name", "1.0"),
            ("on", "true"),
            ("mode", "fast"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            Params {
                limit: Some(2),
                name: Some("1.0".into()),
                on: Some(true),
                mode: Some(Mode::Fast)
            }
        );
        for (list, says) in [
            (&[("limit", "2.5")][..], "expected i64"),
            (&[("limit", "ten")][..], "invalid value: string \"ten\""),
            (&[("on", "yes")][..], "expected a boolean"),
            (&[("mode", "other")][..], "unknown variant"),
            (&[("limit", "1"), ("limit", "2")][..], "duplicate field"),
        ] {
            let err = from_text_pairs::<Params>(pairs(list)).unwrap_err().to_string();
            assert!(err.contains(says), "{list:?}: {err}");
        }
        // A map keyed by integers, in a body: keys read as serde_json reads them.
        let v = serde_json::from_str::<Value>(r#"{"1": "a", "20": "b"}"#).unwrap();
        let keyed: std::collections::BTreeMap<u32, String> = from_value_whole(v).unwrap();
        assert_eq!(keyed.into_iter().collect::<Vec<_>>(), [(1, "a".into()), (20, "b".into())]);
    }
}

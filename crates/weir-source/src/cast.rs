//! Casting column values from PostgreSQL's text output to JSON, and naming types.
//!
//! Where it sits:
//!
//! ```text
//! replication stream ──▶ pgoutput::Decoder ──▶ source assembles transactions
//!                                                 │ ColumnValue::Text + Column::type_oid
//!                                                 ▼
//!                                   cast::TypeRegistry::cast ──▶ the event's JSON ──▶ log
//! ```
//!
//! The text arrives as each type's output function writes it, under the session settings
//! `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`, `bytea_output=hex`,
//! `extra_float_digits=3`. The rules:
//!
//! | type | JSON |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | `int2`, `int4`, `int8`, `oid` | integer |
//! | `float4`, `float8` | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | `numeric` | string, exactly as PostgreSQL wrote it |
//! | `json`, `jsonb` | the parsed JSON value |
//! | `timestamp` | `"2024-01-02T03:04:05.123456"` (RFC 3339 without offset) |
//! | `timestamptz` | `"2024-01-02T03:04:05.123456Z"`, or `+05:30` for other offsets |
//! | `bytea` | lowercase hex without `\x`: `"0a0b"` |
//! | arrays | nested JSON arrays of the element type's JSON, `NULL` as `null` |
//! | everything else | the text as a string (`date`, `time`, `interval`, `uuid`, enums…) |
//!
//! Invariants: [`TypeRegistry::cast`] never panics; text that does not have the shape its type
//! promises (and `infinity`, BC dates, offsets with seconds) becomes the JSON string of the text,
//! so no value is ever lost.
//!
//! References: the data types <https://www.postgresql.org/docs/current/datatype.html>, the
//! array literal syntax <https://www.postgresql.org/docs/current/arrays.html#ARRAYS-IO>, the
//! builtin OIDs `src/include/catalog/pg_type.dat`.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::Value;

/// OID of `text`: the element type used for arrays of learned types.
const TEXT_OID: u32 = 25;

/// Deepest array literal parsed: PostgreSQL's `MAXDIM`.
const MAX_ARRAY_DEPTH: usize = 6;

/// The type names and casts of one database: the builtin types, plus the custom types learned
/// from pgoutput `Type` messages.
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    learned: HashMap<u32, Learned>,
}

#[derive(Debug, Clone)]
struct Learned {
    /// `name`, or `namespace.name` outside `public` and `pg_catalog`.
    display: String,
    /// The name starts with `_`, PostgreSQL's convention for array types.
    is_array: bool,
}

impl TypeRegistry {
    /// A registry that knows the builtin types only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a custom type from a `Type` message (namespace empty for `pg_catalog`).
    pub fn learn(&mut self, oid: u32, namespace: &str, name: &str) {
        let display = match namespace {
            "" | "public" | "pg_catalog" => name.to_owned(),
            namespace => format!("{namespace}.{name}"),
        };
        self.learned.insert(oid, Learned { display, is_array: name.starts_with('_') });
    }

    /// The type's name: `pg_type.typname` for builtins (`int4`, `timestamptz`, `_int4` for
    /// `int4[]`), the learned name (schema-qualified outside `public`), else `oid:<oid>`.
    pub fn type_name(&self, oid: u32) -> String {
        if let Some((name, _)) = builtin(oid) {
            return name.to_owned();
        }
        match self.learned.get(&oid) {
            Some(learned) => learned.display.clone(),
            None => format!("oid:{oid}"),
        }
    }

    /// The JSON value of `text`, the text output of a value of type `oid`.
    pub fn cast(&self, oid: u32, text: &str) -> Value {
        let kind = match builtin(oid) {
            Some((_, kind)) => kind,
            None => match self.learned.get(&oid) {
                Some(learned) if learned.is_array => Kind::Array { elem: TEXT_OID, delim: b',' },
                _ => Kind::Text,
            },
        };
        match kind {
            Kind::Array { elem, delim } => {
                let elem = match builtin(elem) {
                    Some((_, Kind::Array { .. })) | None => Kind::Text,
                    Some((_, kind)) => kind,
                };
                parse_array(text, elem, delim).unwrap_or_else(|| string(text))
            }
            scalar => cast_scalar(scalar, text),
        }
    }
}

/// How a type's text becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Float,
    Numeric,
    Json,
    Timestamp,
    Timestamptz,
    Bytea,
    /// The text as a JSON string.
    Text,
    /// An array literal of `elem` values separated by `delim`.
    Array {
        elem: u32,
        delim: u8,
    },
}

const fn array(elem: u32) -> Kind {
    Kind::Array { elem, delim: b',' }
}

/// The builtin types of `pg_type.dat`: name and cast.
fn builtin(oid: u32) -> Option<(&'static str, Kind)> {
    use Kind::{Bool, Bytea, Float, Int, Json, Numeric, Text, Timestamp, Timestamptz};
    Some(match oid {
        16 => ("bool", Bool),
        17 => ("bytea", Bytea),
        18 => ("char", Text),
        19 => ("name", Text),
        20 => ("int8", Int),
        21 => ("int2", Int),
        22 => ("int2vector", Text),
        23 => ("int4", Int),
        24 => ("regproc", Text),
        25 => ("text", Text),
        26 => ("oid", Int),
        27 => ("tid", Text),
        28 => ("xid", Text),
        29 => ("cid", Text),
        30 => ("oidvector", Text),
        114 => ("json", Json),
        142 => ("xml", Text),
        194 => ("pg_node_tree", Text),
        600 => ("point", Text),
        601 => ("lseg", Text),
        602 => ("path", Text),
        603 => ("box", Text),
        604 => ("polygon", Text),
        628 => ("line", Text),
        650 => ("cidr", Text),
        700 => ("float4", Float),
        701 => ("float8", Float),
        705 => ("unknown", Text),
        718 => ("circle", Text),
        774 => ("macaddr8", Text),
        790 => ("money", Text),
        829 => ("macaddr", Text),
        869 => ("inet", Text),
        1033 => ("aclitem", Text),
        1042 => ("bpchar", Text),
        1043 => ("varchar", Text),
        1082 => ("date", Text),
        1083 => ("time", Text),
        1114 => ("timestamp", Timestamp),
        1184 => ("timestamptz", Timestamptz),
        1186 => ("interval", Text),
        1266 => ("timetz", Text),
        1560 => ("bit", Text),
        1562 => ("varbit", Text),
        1700 => ("numeric", Numeric),
        1790 => ("refcursor", Text),
        2202 => ("regprocedure", Text),
        2203 => ("regoper", Text),
        2204 => ("regoperator", Text),
        2205 => ("regclass", Text),
        2206 => ("regtype", Text),
        2249 => ("record", Text),
        2275 => ("cstring", Text),
        2950 => ("uuid", Text),
        2970 => ("txid_snapshot", Text),
        3220 => ("pg_lsn", Text),
        3614 => ("tsvector", Text),
        3615 => ("tsquery", Text),
        3734 => ("regconfig", Text),
        3769 => ("regdictionary", Text),
        3802 => ("jsonb", Json),
        3904 => ("int4range", Text),
        3906 => ("numrange", Text),
        3908 => ("tsrange", Text),
        3910 => ("tstzrange", Text),
        3912 => ("daterange", Text),
        3926 => ("int8range", Text),
        4072 => ("jsonpath", Text),
        4089 => ("regnamespace", Text),
        4096 => ("regrole", Text),
        4191 => ("regcollation", Text),
        4451 => ("int4multirange", Text),
        4532 => ("nummultirange", Text),
        4533 => ("tsmultirange", Text),
        4534 => ("tstzmultirange", Text),
        4535 => ("datemultirange", Text),
        4536 => ("int8multirange", Text),
        5038 => ("pg_snapshot", Text),
        5069 => ("xid8", Text),
        // Arrays: `array_type_oid` of the element's entry.
        143 => ("_xml", array(142)),
        199 => ("_json", array(114)),
        271 => ("_xid8", array(5069)),
        629 => ("_line", array(628)),
        651 => ("_cidr", array(650)),
        719 => ("_circle", array(718)),
        775 => ("_macaddr8", array(774)),
        791 => ("_money", array(790)),
        1000 => ("_bool", array(16)),
        1001 => ("_bytea", array(17)),
        1002 => ("_char", array(18)),
        1003 => ("_name", array(19)),
        1005 => ("_int2", array(21)),
        1006 => ("_int2vector", array(22)),
        1007 => ("_int4", array(23)),
        1008 => ("_regproc", array(24)),
        1009 => ("_text", array(25)),
        1010 => ("_tid", array(27)),
        1011 => ("_xid", array(28)),
        1012 => ("_cid", array(29)),
        1013 => ("_oidvector", array(30)),
        1014 => ("_bpchar", array(1042)),
        1015 => ("_varchar", array(1043)),
        1016 => ("_int8", array(20)),
        1017 => ("_point", array(600)),
        1018 => ("_lseg", array(601)),
        1019 => ("_path", array(602)),
        // `box` is the one builtin whose array delimiter is `;` (its text contains commas).
        1020 => ("_box", Kind::Array { elem: 603, delim: b';' }),
        1021 => ("_float4", array(700)),
        1022 => ("_float8", array(701)),
        1027 => ("_polygon", array(604)),
        1028 => ("_oid", array(26)),
        1034 => ("_aclitem", array(1033)),
        1040 => ("_macaddr", array(829)),
        1041 => ("_inet", array(869)),
        1115 => ("_timestamp", array(1114)),
        1182 => ("_date", array(1082)),
        1183 => ("_time", array(1083)),
        1185 => ("_timestamptz", array(1184)),
        1187 => ("_interval", array(1186)),
        1231 => ("_numeric", array(1700)),
        1263 => ("_cstring", array(2275)),
        1270 => ("_timetz", array(1266)),
        1561 => ("_bit", array(1560)),
        1563 => ("_varbit", array(1562)),
        2201 => ("_refcursor", array(1790)),
        2207 => ("_regprocedure", array(2202)),
        2208 => ("_regoper", array(2203)),
        2209 => ("_regoperator", array(2204)),
        2210 => ("_regclass", array(2205)),
        2211 => ("_regtype", array(2206)),
        2287 => ("_record", array(2249)),
        2949 => ("_txid_snapshot", array(2970)),
        2951 => ("_uuid", array(2950)),
        3221 => ("_pg_lsn", array(3220)),
        3643 => ("_tsvector", array(3614)),
        3645 => ("_tsquery", array(3615)),
        3735 => ("_regconfig", array(3734)),
        3770 => ("_regdictionary", array(3769)),
        3807 => ("_jsonb", array(3802)),
        3905 => ("_int4range", array(3904)),
        3907 => ("_numrange", array(3906)),
        3909 => ("_tsrange", array(3908)),
        3911 => ("_tstzrange", array(3910)),
        3913 => ("_daterange", array(3912)),
        3927 => ("_int8range", array(3926)),
        4073 => ("_jsonpath", array(4072)),
        4090 => ("_regnamespace", array(4089)),
        4097 => ("_regrole", array(4096)),
        4192 => ("_regcollation", array(4191)),
        5039 => ("_pg_snapshot", array(5038)),
        6150 => ("_int4multirange", array(4451)),
        6151 => ("_nummultirange", array(4532)),
        6152 => ("_tsmultirange", array(4533)),
        6153 => ("_tstzmultirange", array(4534)),
        6155 => ("_datemultirange", array(4535)),
        6157 => ("_int8multirange", array(4536)),
        _ => return None,
    })
}

fn string(text: &str) -> Value {
    Value::String(text.to_owned())
}

/// Casts a non-array value.
fn cast_scalar(kind: Kind, text: &str) -> Value {
    match kind {
        Kind::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => string(text),
        },
        Kind::Int => text.parse::<i64>().map_or_else(|_| string(text), Value::from),
        // Non-finite values (`NaN`, `Infinity`) have no JSON number: `from_f64` refuses them.
        Kind::Float => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| string(text), Value::Number),
        Kind::Json => json(text).unwrap_or_else(|| string(text)),
        Kind::Timestamp => rfc3339(text, false).map_or_else(|| string(text), Value::String),
        Kind::Timestamptz => rfc3339(text, true).map_or_else(|| string(text), Value::String),
        Kind::Bytea => bytea_hex(text).map_or_else(|| string(text), Value::String),
        Kind::Numeric | Kind::Text | Kind::Array { .. } => string(text),
    }
}

/// A `json` or `jsonb` value with every number's digits kept (serde_json's
/// `arbitrary_precision`, on for the whole workspace); `None` when it is not JSON, or when a
/// number would not fit the log's `jsonb`: a `json` column holds any digits, but `jsonb` (and
/// so `weir.events`) stores numbers as `numeric`. Such a value is kept whole as its text rather
/// than failing every append of its transaction.
fn json(text: &str) -> Option<Value> {
    let value: Value = serde_json::from_str(text).ok()?;
    fits_jsonb(&value).then_some(value)
}

/// Whether every number in `value` fits `numeric`, which `jsonb` stores numbers as.
fn fits_jsonb(value: &Value) -> bool {
    match value {
        Value::Number(n) => fits_numeric(n.as_str()),
        Value::Array(items) => items.iter().all(fits_jsonb),
        Value::Object(fields) => fields.values().all(fits_jsonb),
        Value::Null | Value::Bool(_) | Value::String(_) => true,
    }
}

/// Whether the JSON number `n` (`-12.5e-3`) fits `numeric`: at most 131072 digits before the
/// decimal point once its exponent is applied, and a display scale (the digits written after
/// the point, zeros too) of at most 16383 — the limits of `numeric_in`, checked against
/// PostgreSQL 15 (`1e131071` fits, `1e131072` and `1.0e-16383` do not).
fn fits_numeric(n: &str) -> bool {
    let n = n.strip_prefix('-').unwrap_or(n);
    let (mantissa, exponent) = match n.find(['e', 'E']) {
        Some(at) => match n[at + 1..].parse::<i64>() {
            // PostgreSQL refuses exponents from INT_MAX / 2 on, even for zero.
            Ok(e) if e.abs() < 1_073_741_823 => (&n[..at], e),
            _ => return false,
        },
        None => (n, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let scale = (frac.len() as i64).saturating_sub(exponent).max(0);
    let digits = format!("{int}{frac}");
    let leading_zeros = digits.len() - digits.trim_start_matches('0').len();
    if leading_zeros == digits.len() {
        // Zero: only its scale matters.
        return scale <= 16_383;
    }
    let before = (int.len() as i64).saturating_add(exponent).saturating_sub(leading_zeros as i64);
    before <= 131_072 && scale <= 16_383
}

/// `\x0A0b` → `0a0b`; `None` if not the hex format.
fn bytea_hex(text: &str) -> Option<String> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(hex.to_ascii_lowercase())
}

/// Whether `b[at..at + n]` exists and is all ASCII digits.
fn digits_at(b: &[u8], at: usize, n: usize) -> bool {
    b.get(at..at + n).is_some_and(|d| d.iter().all(u8::is_ascii_digit))
}

/// ISO `YYYY-MM-DD HH:MM:SS[.f…][±HH[:MM]]` → RFC 3339. `None` for anything else (`infinity`,
/// `… BC`, offsets with seconds), which the caller keeps as text.
fn rfc3339(text: &str, with_offset: bool) -> Option<String> {
    let b = text.as_bytes();
    // Year: four digits or more (PostgreSQL goes up to 294276).
    let year = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if year < 4 {
        return None;
    }
    let date_end = year + 6;
    let shape = b.get(year) == Some(&b'-')
        && digits_at(b, year + 1, 2)
        && b.get(year + 3) == Some(&b'-')
        && digits_at(b, year + 4, 2)
        && b.get(date_end) == Some(&b' ')
        && digits_at(b, date_end + 1, 2)
        && b.get(date_end + 3) == Some(&b':')
        && digits_at(b, date_end + 4, 2)
        && b.get(date_end + 6) == Some(&b':')
        && digits_at(b, date_end + 7, 2);
    if !shape {
        return None;
    }
    let mut time_end = date_end + 9;
    if b.get(time_end) == Some(&b'.') {
        let fraction = b.get(time_end + 1..)?.iter().take_while(|c| c.is_ascii_digit()).count();
        if fraction == 0 {
            return None;
        }
        time_end += 1 + fraction;
    }
    let (date, time) = (text.get(..date_end)?, text.get(date_end + 1..time_end)?);
    let offset = text.get(time_end..)?;
    let offset = if !with_offset {
        if !offset.is_empty() {
            return None;
        }
        ""
    } else {
        let o = offset.as_bytes();
        // `±HH` or `±HH:MM`; `±HH:MM:SS` (local mean time before 1900) has no RFC 3339 form.
        let hours = matches!(o.first(), Some(b'+' | b'-')) && digits_at(o, 1, 2);
        let minutes = o.len() == 6 && o.get(3) == Some(&b':') && digits_at(o, 4, 2);
        if !hours || !(o.len() == 3 || minutes) {
            return None;
        }
        match offset {
            "+00" | "+00:00" | "-00" | "-00:00" => "Z",
            _ => offset,
        }
    };
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str(date);
    out.push('T');
    out.push_str(time);
    out.push_str(offset);
    if with_offset && offset.len() == 3 {
        out.push_str(":00");
    }
    Some(out)
}

/// Parses an array literal (`{1,2}`, `{{"a b",NULL}}`, `[0:1]={1,2}`) into nested JSON arrays
/// whose elements are cast as `elem`. `None` if the literal is malformed.
fn parse_array(text: &str, elem: Kind, delim: u8) -> Option<Value> {
    let mut parser = ArrayParser { text, pos: 0, elem, delim };
    if text.starts_with('[') {
        // Dimension decoration, present when a lower bound is not 1: `[lb:ub]…=`.
        let eq = text.find('=')?;
        if !valid_dimensions(text.get(..eq)?) {
            return None;
        }
        parser.pos = eq + 1;
    }
    parser.skip_space();
    let value = parser.array(1)?;
    parser.skip_space();
    (parser.pos == text.len()).then_some(value)
}

/// `[lb:ub]` one or more times, bounds being optionally negative integers.
fn valid_dimensions(dims: &str) -> bool {
    let mut rest = dims;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else { return false };
        let Some((bounds, tail)) = inner.split_once(']') else { return false };
        let Some((lower, upper)) = bounds.split_once(':') else { return false };
        if lower.parse::<i32>().is_err() || upper.parse::<i32>().is_err() {
            return false;
        }
        rest = tail;
    }
    true
}

struct ArrayParser<'a> {
    text: &'a str,
    pos: usize,
    elem: Kind,
    delim: u8,
}

/// PostgreSQL's `array_isspace`.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    /// `{` items `}`; items are all sub-arrays or all elements.
    fn array(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_ARRAY_DEPTH || self.peek() != Some(b'{') {
            return None;
        }
        self.pos += 1;
        self.skip_space();
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(Value::Array(items));
        }
        let nested = self.peek() == Some(b'{');
        loop {
            self.skip_space();
            let item = if nested { self.array(depth + 1)? } else { self.element()? };
            items.push(item);
            self.skip_space();
            match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    return Some(Value::Array(items));
                }
                b if b == self.delim => self.pos += 1,
                _ => return None,
            }
        }
    }

    /// One element, quoted or not; unquoted `NULL` is null.
    fn element(&mut self) -> Option<Value> {
        let bytes = self.text.as_bytes();
        if self.peek() == Some(b'"') {
            self.pos += 1;
            let start = self.pos;
            let mut unescaped: Option<Vec<u8>> = None;
            loop {
                match *bytes.get(self.pos)? {
                    b'"' => break,
                    b'\\' => {
                        let buf = unescaped.get_or_insert_with(|| {
                            bytes.get(start..self.pos).unwrap_or_default().to_vec()
                        });
                        buf.push(*bytes.get(self.pos + 1)?);
                        self.pos += 2;
                    }
                    b => {
                        if let Some(buf) = &mut unescaped {
                            buf.push(b);
                        }
                        self.pos += 1;
                    }
                }
            }
            let value: Cow<'_, str> = match unescaped {
                // Only ASCII backslashes were removed: the bytes are still UTF-8.
                Some(buf) => Cow::Owned(String::from_utf8(buf).ok()?),
                None => Cow::Borrowed(self.text.get(start..self.pos)?),
            };
            self.pos += 1;
            return Some(cast_scalar(self.elem, &value));
        }
        let start = self.pos;
        let mut unescaped: Option<Vec<u8>> = None;
        while let Some(b) = self.peek() {
            match b {
                b'}' => break,
                b if b == self.delim => break,
                b'{' | b'"' => return None,
                b'\\' => {
                    let buf = unescaped.get_or_insert_with(|| {
                        bytes.get(start..self.pos).unwrap_or_default().to_vec()
                    });
                    buf.push(*bytes.get(self.pos + 1)?);
                    self.pos += 2;
                }
                b => {
                    if let Some(buf) = &mut unescaped {
                        buf.push(b);
                    }
                    self.pos += 1;
                }
            }
        }
        let value = match unescaped {
            Some(buf) => Cow::Owned(String::from_utf8(buf).ok()?),
            None => {
                // Unquoted trailing whitespace is not part of the element.
                let raw = self.text.get(start..self.pos)?;
                let raw = raw.trim_end_matches(|c: char| c.is_ascii() && is_space(c as u8));
                if raw.is_empty() {
                    return None;
                }
                if raw.eq_ignore_ascii_case("NULL") {
                    return Some(Value::Null);
                }
                Cow::Borrowed(raw)
            }
        };
        Some(cast_scalar(self.elem, &value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn cast(oid: u32, text: &str) -> Value {
        TypeRegistry::new().cast(oid, text)
    }

    #[test]
    fn names_types() {
        let mut types = TypeRegistry::new();
        assert_eq!(types.type_name(23), "int4");
        assert_eq!(types.type_name(1007), "_int4");
        assert_eq!(types.type_name(1184), "timestamptz");
        assert_eq!(types.type_name(1700), "numeric");
        assert_eq!(types.type_name(3802), "jsonb");
        assert_eq!(types.type_name(1042), "bpchar");
        assert_eq!(types.type_name(16384), "oid:16384");
        types.learn(16384, "public", "mood");
        types.learn(16385, "", "_mood");
        types.learn(16386, "sales", "currency");
        types.learn(16387, "pg_catalog", "citext");
        assert_eq!(types.type_name(16384), "mood");
        assert_eq!(types.type_name(16385), "_mood");
        assert_eq!(types.type_name(16386), "sales.currency");
        assert_eq!(types.type_name(16387), "citext");
    }

    #[test]
    fn every_array_type_is_named_after_its_element() {
        for oid in 0..10_000 {
            if let Some((name, Kind::Array { elem, .. })) = builtin(oid) {
                let (elem_name, elem_kind) = builtin(elem).unwrap();
                assert_eq!(name, format!("_{elem_name}"), "oid {oid}");
                assert!(!matches!(elem_kind, Kind::Array { .. }), "oid {oid}");
            }
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(cast(16, "t"), json!(true));
        assert_eq!(cast(16, "f"), json!(false));
        assert_eq!(cast(16, "x"), json!("x"));
        assert_eq!(cast(21, "-32768"), json!(-32768));
        assert_eq!(cast(23, "42"), json!(42));
        assert_eq!(cast(20, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(cast(26, "4294967295"), json!(4_294_967_295_u32));
        assert_eq!(cast(23, "4x"), json!("4x"));
        assert_eq!(cast(700, "1.5"), json!(1.5));
        assert_eq!(cast(700, "0.1"), json!(0.1));
        assert_eq!(cast(701, "1e+100"), json!(1e100));
        assert_eq!(cast(701, "-2.5e-05"), json!(-2.5e-5));
        assert_eq!(cast(701, "NaN"), json!("NaN"));
        assert_eq!(cast(701, "Infinity"), json!("Infinity"));
        assert_eq!(cast(700, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            cast(1700, "123456789012345678901234567890.000000001"),
            json!("123456789012345678901234567890.000000001")
        );
        assert_eq!(cast(1700, "NaN"), json!("NaN"));
        assert_eq!(cast(1700, "Infinity"), json!("Infinity"));
        for oid in [25, 1043, 1042, 19, 18, 2950] {
            assert_eq!(cast(oid, "a b "), json!("a b "), "oid {oid}");
        }
        assert_eq!(
            cast(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
    }

    #[test]
    fn json_values() {
        assert_eq!(
            cast(3802, r#"{"a": [1, 2.5, null], "b": "x"}"#),
            json!({"a": [1, 2.5, null], "b": "x"})
        );
        assert_eq!(cast(114, "[1,2]"), json!([1, 2]));
        assert_eq!(cast(114, "\"s\""), json!("s"));
        assert_eq!(cast(114, "{not json"), json!("{not json"));
    }

    /// Every digit of a JSON number survives, in `json` and `jsonb` columns, at any depth and
    /// in arrays; the text of the number is what the event carries.
    #[test]
    fn json_numbers_keep_every_digit() {
        for text in [
            "123456789012345678901234567890",
            "-123456789012345678901234567890",
            "0.1000000000000000000000000001",
            // serde_json writes an exponent with its sign.
            "1e+400",
            "1.50",
            "-0",
            "18446744073709551616",
        ] {
            for oid in [114, 3802] {
                let v = cast(oid, &format!(r#"{{"n": {text}, "a": [{text}]}}"#));
                assert_eq!(v["n"].to_string(), text, "oid {oid}");
                assert_eq!(v["a"][0].to_string(), text, "oid {oid}");
                assert_eq!(
                    serde_json::to_string(&v).unwrap(),
                    format!(r#"{{"n":{text},"a":[{text}]}}"#)
                );
            }
            assert_eq!(cast(3807, &format!("{{{text}}}"))[0].to_string(), text);
        }
        // Numbers that fit an f64 still read as one.
        assert_eq!(cast(3802, r#"{"x": 2.5}"#)["x"].as_f64(), Some(2.5));
    }

    /// A `json` value whose number `jsonb` cannot hold stays the text it was, never rounded and
    /// never a failed append.
    #[test]
    fn json_numbers_beyond_numeric_keep_their_text() {
        for text in
            ["1e131072", "1.0e-16383", "0e-16384", "0.0001e131076", "1e99999999999999999999"]
        {
            let doc = format!(r#"{{"n": {text}}}"#);
            assert_eq!(cast(114, &doc), json!(doc), "{text}");
        }
        for text in ["1e131071", "1e-16383", "0e-16383", "0.0001e131075", "0.0e200000", "10e131070"]
        {
            let n = cast(114, text);
            let n = n.as_number().unwrap_or_else(|| panic!("{text} stays a number"));
            assert!(weir_core::json::same_number(n, &text.parse().unwrap()), "{text}: {n}");
        }
    }

    /// The other numeric types: integers exact, `numeric` as its exact text, floats as the
    /// double PostgreSQL wrote (with `extra_float_digits=3`, the shortest text that reads back
    /// as the same double), non-finite values as strings.
    #[test]
    fn numbers_of_other_types_are_exact() {
        assert_eq!(cast(20, "-9223372036854775808").to_string(), "-9223372036854775808");
        assert_eq!(
            cast(1700, "123456789012345678901234567890"),
            json!("123456789012345678901234567890")
        );
        assert_eq!(
            cast(1700, "0.1000000000000000000000000001"),
            json!("0.1000000000000000000000000001")
        );
        assert_eq!(cast(1700, "-Infinity"), json!("-Infinity"));
        assert_eq!(cast(701, "1.7976931348623157e+308").as_f64(), Some(f64::MAX));
        assert_eq!(cast(701, "5e-324").as_f64(), Some(5e-324));
        assert_eq!(cast(701, "0.30000000000000004").to_string(), "0.30000000000000004");
        assert_eq!(cast(700, "-Infinity"), json!("-Infinity"));
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(cast(1082, "2024-01-02"), json!("2024-01-02"));
        assert_eq!(cast(1082, "infinity"), json!("infinity"));
        assert_eq!(cast(1082, "0044-03-15 BC"), json!("0044-03-15 BC"));
        assert_eq!(cast(1083, "03:04:05.123456"), json!("03:04:05.123456"));
        assert_eq!(cast(1266, "03:04:05+02"), json!("03:04:05+02"));
        assert_eq!(cast(1186, "P1Y2M3DT4H5M6S"), json!("P1Y2M3DT4H5M6S"));

        assert_eq!(cast(1114, "2024-01-02 03:04:05.123456"), json!("2024-01-02T03:04:05.123456"));
        assert_eq!(cast(1114, "2024-01-02 03:04:05"), json!("2024-01-02T03:04:05"));
        assert_eq!(cast(1114, "12024-01-02 03:04:05"), json!("12024-01-02T03:04:05"));
        assert_eq!(cast(1114, "infinity"), json!("infinity"));
        assert_eq!(cast(1114, "-infinity"), json!("-infinity"));
        assert_eq!(cast(1114, "0044-03-15 12:00:00 BC"), json!("0044-03-15 12:00:00 BC"));
        assert_eq!(cast(1114, "2024-01-02 03:04:05+00"), json!("2024-01-02 03:04:05+00"));
        assert_eq!(cast(1114, "2024-01-02 03:04:05."), json!("2024-01-02 03:04:05."));

        assert_eq!(
            cast(1184, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(cast(1184, "2024-01-02 03:04:05+00"), json!("2024-01-02T03:04:05Z"));
        assert_eq!(cast(1184, "2024-01-02 03:04:05.5+05:30"), json!("2024-01-02T03:04:05.5+05:30"));
        assert_eq!(cast(1184, "2024-01-02 03:04:05-03"), json!("2024-01-02T03:04:05-03:00"));
        assert_eq!(
            cast(1184, "1900-01-01 00:00:00+00:19:32"),
            json!("1900-01-01 00:00:00+00:19:32")
        );
        assert_eq!(cast(1184, "2024-01-02 03:04:05"), json!("2024-01-02 03:04:05"));
        assert_eq!(cast(1184, "0044-03-15 12:00:00+00 BC"), json!("0044-03-15 12:00:00+00 BC"));
        assert_eq!(cast(1184, "infinity"), json!("infinity"));
    }

    #[test]
    fn bytea_as_hex() {
        assert_eq!(cast(17, "\\x0a0b"), json!("0a0b"));
        assert_eq!(cast(17, "\\x0A0B"), json!("0a0b"));
        assert_eq!(cast(17, "\\x"), json!(""));
        assert_eq!(cast(17, "\\x0"), json!("\\x0"));
        assert_eq!(cast(17, "\\000abc"), json!("\\000abc"));
    }

    #[test]
    fn arrays() {
        assert_eq!(cast(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(cast(1007, "{}"), json!([]));
        assert_eq!(cast(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(cast(1007, "[0:1]={1,2}"), json!([1, 2]));
        assert_eq!(cast(1007, "[0:1][-1:0]={{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(cast(1005, "{-1,32767}"), json!([-1, 32767]));
        assert_eq!(cast(1016, "{9223372036854775807}"), json!([i64::MAX]));
        assert_eq!(
            cast(1009, r#"{"a b","c\"d",NULL,"NULL","e\\f",plain}"#),
            json!(["a b", "c\"d", null, "NULL", "e\\f", "plain"])
        );
        assert_eq!(cast(1015, r#"{"",x}"#), json!(["", "x"]));
        assert_eq!(cast(1014, r#"{"a  ","b  "}"#), json!(["a  ", "b  "]));
        assert_eq!(cast(1003, "{pg_catalog,public}"), json!(["pg_catalog", "public"]));
        assert_eq!(cast(1000, "{t,f,NULL}"), json!([true, false, null]));
        assert_eq!(cast(1021, "{1.5,NaN,-Infinity}"), json!([1.5, "NaN", "-Infinity"]));
        assert_eq!(cast(1022, "{1e+100}"), json!([1e100]));
        assert_eq!(cast(1231, "{1.50,NaN}"), json!(["1.50", "NaN"]));
        assert_eq!(
            cast(2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])
        );
        assert_eq!(cast(1182, "{2024-01-02,infinity}"), json!(["2024-01-02", "infinity"]));
        assert_eq!(cast(1183, "{03:04:05}"), json!(["03:04:05"]));
        assert_eq!(cast(1187, "{P1D,PT1H}"), json!(["P1D", "PT1H"]));
        assert_eq!(
            cast(1115, r#"{"2024-01-02 03:04:05",NULL}"#),
            json!(["2024-01-02T03:04:05", null])
        );
        assert_eq!(
            cast(1185, r#"{"2024-01-02 03:04:05.5+00"}"#),
            json!(["2024-01-02T03:04:05.5Z"])
        );
        assert_eq!(
            cast(3807, r#"{"{\"a\": 1}","[1, 2]",3,NULL}"#),
            json!([{"a": 1}, [1, 2], 3, null])
        );
        assert_eq!(cast(199, r#"{"\"s\""}"#), json!(["s"]));
        assert_eq!(cast(1001, r#"{"\\x0a0b","\\x"}"#), json!(["0a0b", ""]));
        assert_eq!(cast(1020, "{(1,1),(0,0);(2,2),(1,1)}"), json!(["(1,1),(0,0)", "(2,2),(1,1)"]));
        assert_eq!(cast(1009, "{\"ünï\",çödé}"), json!(["ünï", "çödé"]));
        assert_eq!(cast(1009, "{ a , b }"), json!(["a", "b"]));
    }

    #[test]
    fn malformed_arrays_fall_back_to_text() {
        for text in [
            "",
            "{",
            "}",
            "{1,2",
            "{1,,2}",
            "{1,2}x",
            "{1,{2}}",
            "{{1},2}",
            "{\"a}",
            "{a\"b}",
            "[0:1]{1,2}",
            "[0:x]={1}",
            "[0:1]=",
            "{{{{{{{1}}}}}}}",
            "{\\}",
            "1,2",
        ] {
            assert_eq!(cast(1007, text), json!(text), "{text:?}");
        }
        // The six dimensions PostgreSQL allows are fine.
        assert_eq!(cast(1007, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
        // Elements of the wrong type are kept as strings, the array stays an array.
        assert_eq!(cast(1007, "{1,x}"), json!([1, "x"]));
    }

    #[test]
    fn learned_types() {
        let mut types = TypeRegistry::new();
        types.learn(16384, "public", "mood");
        types.learn(16385, "public", "_mood");
        assert_eq!(types.cast(16384, "happy"), json!("happy"));
        assert_eq!(
            types.cast(16385, r#"{happy,"very sad",NULL}"#),
            json!(["happy", "very sad", null])
        );
        assert_eq!(types.cast(16385, "not an array"), json!("not an array"));
        assert_eq!(types.cast(99999, "whatever"), json!("whatever"));
        assert_eq!(types.cast(99999, "{1,2}"), json!("{1,2}"));
    }

    fn interesting_oid() -> impl Strategy<Value = u32> {
        prop_oneof![
            prop::sample::select(vec![
                16, 17, 20, 21, 23, 25, 26, 114, 700, 701, 1000, 1001, 1007, 1009, 1020, 1082,
                1114, 1115, 1184, 1185, 1700, 3802, 3807, 16384, 16385,
            ]),
            any::<u32>(),
        ]
    }

    proptest! {
        #[test]
        fn cast_never_panics(oid in interesting_oid(), text in any::<String>()) {
            let mut types = TypeRegistry::new();
            types.learn(16385, "public", "_mood");
            let _ = types.cast(oid, &text);
        }

        #[test]
        fn cast_never_panics_on_literal_like_text(
            oid in interesting_oid(),
            text in r#"[\[\]{}",;:=\\ 0-9a-zA-Z.+\-ü]{0,40}"#,
        ) {
            let mut types = TypeRegistry::new();
            types.learn(16385, "public", "_mood");
            let _ = types.cast(oid, &text);
        }

        #[test]
        fn text_arrays_round_trip(
            items in proptest::collection::vec(proptest::option::of(any::<String>()), 0..6),
        ) {
            // Quote every element the way array_out may: the parse gives the items back.
            let body: Vec<String> = items
                .iter()
                .map(|item| match item {
                    None => "NULL".to_owned(),
                    Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
                })
                .collect();
            let literal = format!("{{{}}}", body.join(","));
            let expected: Vec<Value> =
                items.into_iter().map(|i| i.map_or(Value::Null, Value::String)).collect();
            prop_assert_eq!(cast(1009, &literal), Value::Array(expected));
        }
    }
}

//! Cron expressions for periodic jobs, read in an IANA time zone (UTC unless given).
//!
//! Parsing and the search for the next time are the `croner` crate's (Vixie cron, plus `L`,
//! `W`, `#` and a `+` prefix on the weekday field for "day of month and day of week"); time
//! zones are `chrono-tz`'s. This module adds what a job queue needs around them: errors that
//! name the column, a time zone per expression, and times as UTC instants (the marks in
//! `weir.job_periodic` are instants, so a zone's rules changing never moves a mark).
//!
//! Five fields, `minute hour day-of-month month day-of-week`, or six with a leading `second`.
//! Each field takes `*`, a value, a range `a-b`, a step `*/n`, `a-b/n` or `a/n`, and lists of
//! those separated by commas; months and weekdays also take names (`jan`, `mon`), and Sunday is
//! `0` or `7`. As in Vixie cron, when both day fields are restricted a day matches if either
//! does. Shorthands: `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
//! `@hourly`.
//!
//! Daylight saving time, for an expression read in a zone that has it:
//!
//! ```text
//! spring forward (Europe/Paris, last Sunday of March, 02:00 → 03:00):
//!   a time in the gap (`30 2 * * *`) does not exist that day: it runs once, at the first
//!   instant after the gap (03:00 CEST); times outside the gap are untouched
//! fall back (last Sunday of October, 03:00 → 02:00):
//!   a fixed time in the repeated hour (`30 2 * * *`) runs once, at its first pass (CEST);
//!   an interval (`*/15 * * * *`, `0 * * * *`) follows real time and runs in both passes
//! ```
//!
//! A bad expression is an error that names the column where it goes wrong, so a periodic job
//! with a typo is rejected when the runner starts rather than never running. croner's errors
//! carry no position: the column is found by parsing each field, item and part on its own.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed cron expression and the time zone it is read in.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    source: String,
    timezone: Tz,
    schedule: croner::Cron,
}

/// A cron expression that does not parse, with the 1-based column where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad cron expression `{expression}` at column {column}: {problem}")]
pub struct CronError {
    /// The expression as given.
    pub expression: String,
    /// 1-based column (in characters) of the offending part.
    pub column: usize,
    /// What is wrong there.
    pub problem: String,
}

/// A time zone name that is not in the IANA database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown time zone `{name}`: use an IANA name such as `Europe/Paris`, `America/New_York` or \
     `UTC` (the names are case-sensitive)"
)]
pub struct TimeZoneError {
    /// The name as given.
    pub name: String,
}

/// Each field's name and what it takes, for error messages.
const FIELDS_6: [&str; 6] = [
    "second field (0-59)",
    "minute field (0-59)",
    "hour field (0-23)",
    "day of month field (1-31, L, W)",
    "month field (1-12, jan-dec)",
    "day of week field (0-7 with 0 and 7 Sunday, sun-sat, #, L)",
];

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        // Five or six fields, as documented; croner's optional seventh (year) is not offered.
        .year(Year::Disallowed)
        // `a/n` (from a to the end in steps of n), as Vixie cron reads it.
        .sloppy_ranges(true)
        .build()
}

impl Cron {
    /// Parses an expression, read in UTC.
    pub fn parse(expression: &str) -> Result<Self, CronError> {
        let err = |column: usize, problem: String| CronError {
            expression: expression.to_string(),
            column,
            problem,
        };
        let trimmed = expression.trim();
        let text = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@hourly" => trimmed,
            "@midnight" => "@daily",
            s if s.starts_with('@') => {
                let col = expression.find('@').unwrap_or(0) + 1;
                return Err(err(col, format!("unknown shorthand `{trimmed}`")));
            }
            _ => expression,
        };
        // croner reads `1,,2` as `1,2`; an empty item is a typo worth naming.
        for (at, field) in words(expression) {
            if let Some(i) = field.split(',').position(str::is_empty) {
                let offset: usize = field.split(',').take(i).map(|item| item.len() + 1).sum();
                let column = expression[..at + offset].chars().count() + 1;
                return Err(err(column, format!("empty item in `{field}`")));
            }
        }
        match parser().parse(text) {
            Ok(schedule) => {
                Ok(Self { source: expression.to_string(), timezone: Tz::UTC, schedule })
            }
            Err(e) => {
                let (column, problem) = locate(expression, &e);
                Err(err(column, problem))
            }
        }
    }

    /// Parses an expression read in the IANA time zone `timezone` (`Europe/Paris`).
    pub fn parse_in(expression: &str, timezone: &str) -> Result<Self, crate::Error> {
        let cron = Self::parse(expression)?;
        Ok(cron.in_timezone(parse_timezone(timezone)?))
    }

    /// The same expression read in `timezone`.
    pub fn in_timezone(mut self, timezone: Tz) -> Self {
        self.timezone = timezone;
        self
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The time zone it is read in.
    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The first time strictly after `after` (to the second) that matches, read in the
    /// expression's time zone, or `None` if none does within croner's search limit (e.g.
    /// `0 0 30 2 *`).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.timezone);
        self.schedule.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The latest time at or before `at` that matches, or `None` if none does within croner's
    /// search limit.
    pub fn last_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.timezone);
        self.schedule.find_previous_occurrence(&local, true).ok().map(|t| t.with_timezone(&Utc))
    }
}

/// Parses an IANA time zone name.
pub(crate) fn parse_timezone(name: &str) -> Result<Tz, TimeZoneError> {
    name.parse().map_err(|_| TimeZoneError { name: name.to_string() })
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // croner's own Debug prints every bit of its fields (thousands of lines).
        f.debug_struct("Cron")
            .field("expression", &self.source)
            .field("timezone", &self.timezone)
            .finish()
    }
}

impl FromStr for Cron {
    type Err = CronError;
    fn from_str(s: &str) -> Result<Self, CronError> {
        Self::parse(s)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if self.timezone != Tz::UTC {
            write!(f, " ({})", self.timezone)?;
        }
        Ok(())
    }
}

/// The 1-based column and a description of what croner refused in `expression`: the first
/// field that fails on its own (the others `*`), then within it the first comma item, then the
/// first part of the item (range start, range end, step) that fails on its own.
fn locate(expression: &str, error: &croner::errors::CronError) -> (usize, String) {
    let column = |byte: usize| expression[..byte].chars().count() + 1;
    let fields = words(expression);
    let names: &[&str] = match fields.len() {
        5 => &FIELDS_6[1..],
        6 => &FIELDS_6,
        0 => return (1, "the expression is empty".into()),
        n => {
            let at = fields.get(6).map_or(expression.len(), |f| f.0);
            return (
                column(at).min(expression.chars().count().max(1)),
                format!(
                    "expected 5 fields (minute hour day month weekday) or 6 (with seconds \
                     first), found {n}"
                ),
            );
        }
    };
    // Whether `part` parses alone in field `i`.
    let alone = |i: usize, part: &str| {
        let probe: Vec<&str> = (0..fields.len()).map(|j| if j == i { part } else { "*" }).collect();
        parser().parse(&probe.join(" ")).err()
    };
    for (i, (at, field)) in fields.iter().enumerate() {
        let Some(field_error) = alone(i, field) else { continue };
        let name = names[i];
        let mut offset = 0;
        for item in field.split(',') {
            if let Some(item_error) = alone(i, item) {
                // The parts of `a-b/n`: `a`, `b` (probed alone) and `n` (probed as `*/n`).
                let (range, step) = match item.split_once('/') {
                    Some((r, s)) => (r, Some(s)),
                    None => (item, None),
                };
                let mut parts: Vec<(usize, String)> = Vec::new();
                match range.split_once('-') {
                    Some((a, b)) => {
                        parts.push((0, a.to_string()));
                        parts.push((a.len() + 1, b.to_string()));
                    }
                    None if range != "*" && !range.is_empty() => parts.push((0, range.into())),
                    None => {}
                }
                if let Some(s) = step {
                    parts.push((range.len() + 1, format!("*/{s}")));
                }
                let mut at_part = 0;
                let mut problem = describe(&item_error);
                for (part_at, part) in parts {
                    if let Some(e) = alone(i, &part) {
                        at_part = part_at;
                        problem = describe(&e);
                        break;
                    }
                }
                return (
                    column(at + offset + at_part),
                    format!("`{item}` in the {name}: {problem}"),
                );
            }
            offset += item.len() + 1;
        }
        return (column(*at), format!("`{field}` in the {name}: {}", describe(&field_error)));
    }
    // Every field parses alone: the combination is refused.
    (1, describe(error))
}

/// croner's message, without its type names.
fn describe(error: &croner::errors::CronError) -> String {
    use croner::errors::CronError as E;
    match error {
        E::InvalidPattern(m) | E::IllegalCharacters(m) | E::ComponentError(m) => m.clone(),
        other => other.to_string(),
    }
}

/// The whitespace-separated words of `text` with their byte offsets.
fn words(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push((s, &text[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &text[s..]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn next_times() {
        let c = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(c.next_after(at("2024-01-01T10:07:30Z")), Some(at("2024-01-01T10:15:00Z")));
        let c = Cron::parse("0 9 * * mon-fri").unwrap();
        // 2024-01-06 is a Saturday.
        assert_eq!(c.next_after(at("2024-01-06T12:00:00Z")), Some(at("2024-01-08T09:00:00Z")));
        let c = Cron::parse("@monthly").unwrap();
        assert_eq!(c.next_after(at("2024-01-31T23:59:59Z")), Some(at("2024-02-01T00:00:00Z")));
        let c = Cron::parse("@midnight").unwrap();
        assert_eq!(c.next_after(at("2024-01-31T23:59:59Z")), Some(at("2024-02-01T00:00:00Z")));
        let c = Cron::parse("*/2 * * * * *").unwrap();
        assert_eq!(c.next_after(at("2024-01-01T00:00:01.5Z")), Some(at("2024-01-01T00:00:02Z")));
        let c = Cron::parse("0 0 29 2 *").unwrap();
        assert_eq!(c.next_after(at("2024-03-01T00:00:00Z")), Some(at("2028-02-29T00:00:00Z")));
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_after(at("2024-01-01T00:00:00Z")), None);
        // Both day fields restricted: either matches (the 1st, or any Sunday).
        let c = Cron::parse("0 0 1 * 7").unwrap();
        assert_eq!(c.next_after(at("2024-01-02T00:00:00Z")), Some(at("2024-01-07T00:00:00Z")));
        // `a/n`: from a to the end in steps of n.
        let c = Cron::parse("50/5 * * * *").unwrap();
        assert_eq!(c.next_after(at("2024-01-01T10:51:00Z")), Some(at("2024-01-01T10:55:00Z")));
        assert_eq!(c.next_after(at("2024-01-01T10:56:00Z")), Some(at("2024-01-01T11:50:00Z")));
        assert_eq!(
            c.last_at_or_before(at("2024-01-01T10:55:00Z")),
            Some(at("2024-01-01T10:55:00Z"))
        );
        assert_eq!(
            c.last_at_or_before(at("2024-01-01T10:49:59Z")),
            Some(at("2024-01-01T09:55:00Z"))
        );
    }

    #[test]
    fn errors_name_the_column() {
        let e = Cron::parse("* * 32 * *").unwrap_err();
        assert_eq!(e.column, 5, "{e}");
        assert!(e.problem.contains("day of month"), "{e}");
        let e = Cron::parse("0 9 * * mon-fry").unwrap_err();
        assert_eq!(e.column, 13, "{e}");
        assert!(e.problem.contains("day of week"), "{e}");
        let e = Cron::parse("*/0 * * * *").unwrap_err();
        assert_eq!(e.column, 3, "{e}");
        let e = Cron::parse("0 0 1,2,99 * *").unwrap_err();
        assert_eq!(e.column, 9, "{e}");
        assert!(e.problem.contains("`99` in the day of month field (1-31"), "{e}");
        let e = Cron::parse("* * * *").unwrap_err();
        assert!(e.problem.contains("found 4"), "{e}");
        let e = Cron::parse("@sometimes").unwrap_err();
        assert_eq!(e.column, 1);
        let e = Cron::parse("1,,2 * * * *").unwrap_err();
        assert_eq!(e.column, 3, "{e}");
        assert!(Cron::parse("").is_err());
        let e = Cron::parse("5-1 * * * *").unwrap_err();
        assert!(e.problem.contains("`5-1` in the minute field (0-59)"), "{e}");
        assert!(Cron::parse("0 0 * 13 *").unwrap_err().problem.contains("month field (1-12"));
    }

    #[test]
    fn timezones() {
        // 09:00 in New York is 14:00 UTC in winter (EST) and 13:00 in summer (EDT).
        let c = Cron::parse_in("0 9 * * *", "America/New_York").unwrap();
        assert_eq!(c.next_after(at("2024-01-15T00:00:00Z")), Some(at("2024-01-15T14:00:00Z")));
        assert_eq!(c.next_after(at("2024-07-15T00:00:00Z")), Some(at("2024-07-15T13:00:00Z")));
        assert_eq!(c.to_string(), "0 9 * * * (America/New_York)");
        let e = Cron::parse_in("0 9 * * *", "Europe/Pariss").unwrap_err();
        assert!(e.to_string().contains("unknown time zone `Europe/Pariss`"), "{e}");
        assert!(Cron::parse_in("0 9 * * *", "UTC").is_ok());
    }

    /// Every time in `[from, to)`.
    fn times(c: &Cron, from: &str, to: &str) -> Vec<DateTime<Utc>> {
        let (mut t, to) = (at(from), at(to));
        let mut out = Vec::new();
        while let Some(n) = c.next_after(t).filter(|n| *n < to) {
            out.push(n);
            t = n;
        }
        out
    }

    #[test]
    fn spring_forward_runs_a_time_in_the_gap_once_after_it() {
        // 2024-03-31 in Paris: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
        let c = Cron::parse_in("30 2 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            times(&c, "2024-03-29T12:00:00Z", "2024-04-02T00:00:00Z"),
            [
                at("2024-03-30T01:30:00Z"), // 02:30 CET
                at("2024-03-31T01:00:00Z"), // 03:00 CEST, the first instant after the gap
                at("2024-04-01T00:30:00Z"), // 02:30 CEST
            ]
        );
        // Times outside the gap are untouched.
        let c = Cron::parse_in("30 1,3 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            times(&c, "2024-03-30T23:00:00Z", "2024-03-31T03:00:00Z"),
            [at("2024-03-31T00:30:00Z"), at("2024-03-31T01:30:00Z")]
        );
    }

    #[test]
    fn fall_back_runs_a_fixed_time_once_and_an_interval_in_both_passes() {
        // 2024-10-27 in Paris: 03:00 CEST becomes 02:00 CET; 02:00-03:00 happens twice.
        let c = Cron::parse_in("30 2 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            times(&c, "2024-10-26T12:00:00Z", "2024-10-28T12:00:00Z"),
            [
                at("2024-10-27T00:30:00Z"), // 02:30 CEST, the first pass only
                at("2024-10-28T01:30:00Z"), // 02:30 CET
            ]
        );
        let c = Cron::parse_in("0 * * * *", "Europe/Paris").unwrap();
        assert_eq!(
            times(&c, "2024-10-26T23:30:00Z", "2024-10-27T02:30:00Z"),
            [
                at("2024-10-27T00:00:00Z"), // 02:00 CEST
                at("2024-10-27T01:00:00Z"), // 02:00 CET
                at("2024-10-27T02:00:00Z"), // 03:00 CET
            ]
        );
    }
}

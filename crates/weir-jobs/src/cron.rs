//! Cron expressions for periodic jobs, evaluated in UTC.
//!
//! Five fields, `minute hour day-of-month month day-of-week`, or six with a leading `second`.
//! Each field takes `*`, a value, a range `a-b`, a step `*/n` or `a-b/n` or `a/n`, and lists of
//! those separated by commas; months and weekdays also take names (`jan`, `mon`), and Sunday is
//! `0` or `7`. As in Vixie cron, when both day fields are restricted a day matches if either
//! does. Shorthands: `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
//! `@hourly`.
//!
//! A bad expression is an error that names the column where it goes wrong, so a periodic job
//! with a typo is rejected when the runner starts rather than never running.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};

/// A parsed cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    source: String,
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether day-of-month, resp. day-of-week, was restricted (not `*`).
    days_restricted: bool,
    weekdays_restricted: bool,
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

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const SECOND: Field = Field { name: "second", min: 0, max: 59, names: &[] };
const MINUTE: Field = Field { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: Field = Field { name: "hour", min: 0, max: 23, names: &[] };
const DAY: Field = Field { name: "day of month", min: 1, max: 31, names: &[] };
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
};
const WEEKDAY: Field = Field {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Cron {
    /// Parses an expression.
    pub fn parse(expression: &str) -> Result<Self, CronError> {
        let err = |column: usize, problem: String| CronError {
            expression: expression.to_string(),
            column,
            problem,
        };
        let trimmed = expression.trim();
        let expanded = match trimmed {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            s if s.starts_with('@') => {
                let col = expression.find('@').unwrap_or(0) + 1;
                return Err(err(col, format!("unknown shorthand `{s}`")));
            }
            _ => "",
        };
        // Fields with their 1-based starting column in the original text.
        let (text, offsets): (&str, bool) =
            if expanded.is_empty() { (expression, true) } else { (expanded, false) };
        let mut fields: Vec<(usize, &str)> = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices() {
            match (c.is_whitespace(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    fields.push((s, &text[s..i]));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            fields.push((s, &text[s..]));
        }
        let column = |byte: usize| {
            if offsets { expression[..byte].chars().count() + 1 } else { 1 }
        };
        let layout: &[&Field] = match fields.len() {
            5 => &[&MINUTE, &HOUR, &DAY, &MONTH, &WEEKDAY],
            6 => &[&SECOND, &MINUTE, &HOUR, &DAY, &MONTH, &WEEKDAY],
            n => {
                return Err(err(
                    fields.get(6).map_or(expression.chars().count().max(1), |f| column(f.0)),
                    format!(
                        "expected 5 fields (minute hour day month weekday) or 6 (with seconds \
                         first), found {n}"
                    ),
                ));
            }
        };
        let mut sets = Vec::with_capacity(6);
        for ((at, text), field) in fields.iter().zip(layout) {
            let set = parse_field(text, field)
                .map_err(|(offset, problem)| err(column(at + offset), problem))?;
            sets.push((set, !text.starts_with('*')));
        }
        if layout.len() == 5 {
            sets.insert(0, (1, true)); // second 0
        }
        let mut weekdays = sets[5].0;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7); // 7 is Sunday too
        }
        Ok(Self {
            source: expression.to_string(),
            seconds: sets[0].0,
            minutes: sets[1].0,
            hours: sets[2].0,
            days: sets[3].0,
            months: sets[4].0,
            weekdays,
            days_restricted: sets[3].1,
            weekdays_restricted: sets[5].1,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn day_matches(&self, t: &DateTime<Utc>) -> bool {
        let dom = self.days & (1 << t.day()) != 0;
        let dow = self.weekdays & (1 << t.weekday().num_days_from_sunday()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first time strictly after `after` that matches, or `None` if none does within the
    /// next eight years (e.g. `0 0 30 2 *`).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = after.with_nanosecond(0)? + Duration::seconds(1);
        let limit = after + Duration::days(366 * 8);
        while t <= limit {
            if self.months & (1 << t.month()) == 0 {
                // First second of the next month.
                let (y, m) =
                    if t.month() == 12 { (t.year() + 1, 1) } else { (t.year(), t.month() + 1) };
                t = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()?;
                continue;
            }
            if !self.day_matches(&t) {
                t = Utc.with_ymd_and_hms(t.year(), t.month(), t.day(), 0, 0, 0).single()?
                    + Duration::days(1);
                continue;
            }
            if self.hours & (1 << t.hour()) == 0 {
                t = t.with_minute(0)?.with_second(0)? + Duration::hours(1);
                continue;
            }
            if self.minutes & (1 << t.minute()) == 0 {
                t = t.with_second(0)? + Duration::minutes(1);
                continue;
            }
            if self.seconds & (1 << t.second()) == 0 {
                t += Duration::seconds(1);
                continue;
            }
            return Some(t);
        }
        None
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
        f.write_str(&self.source)
    }
}

/// Parses one field into a bit set; errors carry the byte offset inside the field.
fn parse_field(text: &str, field: &Field) -> Result<u64, (usize, String)> {
    let mut set = 0u64;
    let mut offset = 0;
    for part in text.split(',') {
        if part.is_empty() {
            return Err((offset, format!("empty item in the {} field", field.name)));
        }
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let at = offset + r.len() + 1;
                let step: u32 = s.parse().map_err(|_| {
                    (at, format!("step `{s}` in the {} field is not a number", field.name))
                })?;
                if step == 0 {
                    return Err((
                        at,
                        format!("step in the {} field must be at least 1", field.name),
                    ));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (field.min, field.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let lo = value(a, field).map_err(|p| (offset, p))?;
            let hi = value(b, field).map_err(|p| (offset + a.len() + 1, p))?;
            if lo > hi {
                return Err((
                    offset,
                    format!("range {a}-{b} in the {} field is backwards", field.name),
                ));
            }
            (lo, hi)
        } else {
            let v = value(range, field).map_err(|p| (offset, p))?;
            // `a/n` means from a to the end in steps of n.
            (v, if part.contains('/') { field.max } else { v })
        };
        let mut v = lo;
        while v <= hi {
            set |= 1 << v;
            v += step;
        }
        offset += part.len() + 1;
    }
    Ok(set)
}

fn value(text: &str, field: &Field) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = field.names.iter().position(|n| *n == lower) {
        return Ok(i as u32 + if field.min == 1 { 1 } else { 0 });
    }
    let v: u32 = text.parse().map_err(|_| {
        if field.names.is_empty() {
            format!("`{text}` is not a number in the {} field", field.name)
        } else {
            format!("`{text}` is not a number or a name in the {} field", field.name)
        }
    })?;
    if v < field.min || v > field.max {
        return Err(format!("{} {v} is out of range {}-{}", field.name, field.min, field.max));
    }
    Ok(v)
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
        let c = Cron::parse("*/2 * * * * *").unwrap();
        assert_eq!(c.next_after(at("2024-01-01T00:00:01.5Z")), Some(at("2024-01-01T00:00:02Z")));
        let c = Cron::parse("0 0 29 2 *").unwrap();
        assert_eq!(c.next_after(at("2024-03-01T00:00:00Z")), Some(at("2028-02-29T00:00:00Z")));
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_after(at("2024-01-01T00:00:00Z")), None);
        // Both day fields restricted: either matches (the 1st, or any Sunday).
        let c = Cron::parse("0 0 1 * 7").unwrap();
        assert_eq!(c.next_after(at("2024-01-02T00:00:00Z")), Some(at("2024-01-07T00:00:00Z")));
    }

    #[test]
    fn errors_name_the_column() {
        let e = Cron::parse("* * 32 * *").unwrap_err();
        assert_eq!(e.column, 5, "{e}");
        assert!(e.problem.contains("day of month 32 is out of range 1-31"), "{e}");
        let e = Cron::parse("0 9 * * mon-fry").unwrap_err();
        assert_eq!(e.column, 13, "{e}");
        let e = Cron::parse("*/0 * * * *").unwrap_err();
        assert_eq!(e.column, 3, "{e}");
        let e = Cron::parse("* * * *").unwrap_err();
        assert!(e.problem.contains("found 4"), "{e}");
        let e = Cron::parse("@sometimes").unwrap_err();
        assert_eq!(e.column, 1);
        assert!(Cron::parse("5-1 * * * *").is_err());
        assert!(Cron::parse("1,,2 * * * *").is_err());
    }
}

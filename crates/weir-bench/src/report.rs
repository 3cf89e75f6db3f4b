//! How the benchmarks print their figures: thousands separators, ratios, byte sizes and the
//! verdict beside a target. A missed target is printed, never an error: the command succeeds.
//!
//! Each benchmark also [`record`]s the figures of its summary that have a ratio or a target, one
//! [`Row`] each, in a process-wide list; `weir-bench all` prints them in one [`table`] at the
//! end. A row's ratio is measured / reference, so higher is better; for a latency the
//! benchmark records reference / measured instead (the figure says which).

/// `x` rounded to a whole number, with `,` between groups of three digits.
pub(crate) fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A ratio with enough digits to tell small ones apart.
pub(crate) fn ratio(x: f64) -> String {
    if x < 0.1 { format!("{x:.3}x") } else { format!("{x:.2}x") }
}

/// Whether a target was met, as the summary tables say it.
pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The rows as one padded Markdown table (benchmark, figure, measured, reference, ratio, target,
/// verdict): aligned in a terminal, pasted as is into `docs/benchmarks.md`. A cell longer than
/// [`TABLE_CELL_MAX`] characters (an error's chain) is cut with `…`; `|` and newlines in a cell
/// are escaped so that a row stays one line.
pub(crate) fn table(rows: &[Row]) -> String {
    const HEADER: [&str; 7] =
        ["benchmark", "figure", "measured", "reference", "ratio", "target", "verdict"];
    // The ratio column is right-aligned, the others left.
    const RIGHT: [bool; 7] = [false, false, false, false, true, false, false];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.benchmark.to_string(),
                r.figure.clone(),
                r.measured.clone(),
                r.reference.clone(),
                r.ratio.map(ratio).unwrap_or_default(),
                r.target.clone().unwrap_or_default(),
                r.met.map(verdict).unwrap_or_default().to_string(),
            ]
            .map(|c| table_cell(&c))
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::from("|");
        for ((c, w), right) in cells.iter().zip(widths).zip(RIGHT) {
            if right {
                out.push_str(&format!(" {c:>w$} |"));
            } else {
                out.push_str(&format!(" {c:<w$} |"));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&HEADER.map(String::from));
    out.push('|');
    for (w, right) in widths.into_iter().zip(RIGHT) {
        let dashes = "-".repeat(w.max(3));
        out.push_str(&if right { format!(" {}: |", &dashes[1..]) } else { format!(" {dashes} |") });
    }
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// Longest cell of [`table`], in characters.
pub(crate) const TABLE_CELL_MAX: usize = 80;

/// A cell on one line: terminal colour codes (an error quoting a colourised log) dropped,
/// control characters as spaces, `|` escaped; cut at [`TABLE_CELL_MAX`].
fn table_cell(s: &str) -> String {
    let mut clean = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            // An escape sequence: ESC, `[`, parameters, then a final letter.
            '\x1b' => {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '|' => clean.push_str("\\|"),
            c if c.is_control() => clean.push(' '),
            c => clean.push(c),
        }
    }
    let s = clean;
    if s.chars().count() <= TABLE_CELL_MAX {
        s
    } else {
        let mut cut: String = s.chars().take(TABLE_CELL_MAX - 1).collect();
        cut.push('…');
        cut
    }
}

/// Bytes in kB, MB or GB (powers of 1024).
pub(crate) fn human_bytes(b: i64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.0} MB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} kB", b / 1024.0)
    }
}

/// One figure of a benchmark against its same-run reference, for `weir-bench all`'s table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) benchmark: &'static str,
    pub(crate) figure: String,
    pub(crate) measured: String,
    pub(crate) reference: String,
    pub(crate) ratio: Option<f64>,
    pub(crate) target: Option<String>,
    pub(crate) met: Option<bool>,
}

static ROWS: std::sync::Mutex<Vec<Row>> = std::sync::Mutex::new(Vec::new());

/// Records a row (a process-wide list; printing is up to the caller).
pub(crate) fn record(row: Row) {
    ROWS.lock().expect("rows").push(row);
}

/// Every row recorded so far, in order.
pub(crate) fn recorded() -> Vec<Row> {
    ROWS.lock().expect("rows").clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-1_000.0), "-1,000");
        assert_eq!(ratio(0.05), "0.050x");
        assert_eq!(ratio(1.234), "1.23x");
        assert_eq!(human_bytes(3 << 20), "3 MB");
    }

    fn row(benchmark: &'static str, figure: &str, ratio: Option<f64>, met: Option<bool>) -> Row {
        Row {
            benchmark,
            figure: figure.into(),
            measured: "54,172/s".into(),
            reference: if ratio.is_some() {
                "106,096/s (pg_recvlogical)".into()
            } else {
                "".into()
            },
            ratio,
            target: met.map(|_| "≥ 0.80x".into()),
            met,
        }
    }

    #[test]
    fn a_table_of_rows() {
        let rows = [
            row("ingest", "100-row transactions, changes/s", Some(0.51), Some(false)),
            row("jobs", "vacuum: last round / first", Some(1.0), None),
            row("fanout", "a | in a \x1b[2mfigure\x1b[0m\nand a newline", None, Some(true)),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "| benchmark | figure                          | measured | reference                  | ratio | target  | verdict |",
                "| --------- | ------------------------------- | -------- | -------------------------- | ----: | ------- | ------- |",
                "| ingest    | 100-row transactions, changes/s | 54,172/s | 106,096/s (pg_recvlogical) | 0.51x | ≥ 0.80x | MISSED  |",
                "| jobs      | vacuum: last round / first      | 54,172/s | 106,096/s (pg_recvlogical) | 1.00x |         |         |",
                "| fanout    | a \\| in a figure and a newline  | 54,172/s |                            |       | ≥ 0.80x | met     |",
            ]
        );
        // Every line is as wide as the header, in characters (`≥` is one).
        assert!(lines.iter().all(|l| l.chars().count() == lines[0].chars().count()));
        assert_eq!(table(&[]).lines().count(), 2);
    }

    #[test]
    fn a_long_cell_is_cut() {
        let mut r = row("sinks", "the benchmark failed", None, Some(false));
        r.measured = "x".repeat(200);
        let t = table(&[r]);
        let cell = format!("{}…", "x".repeat(TABLE_CELL_MAX - 1));
        assert!(t.lines().nth(2).unwrap().contains(&format!(" {cell} |")));
    }

    #[test]
    fn rows_are_recorded_in_order() {
        let before = recorded().len();
        record(row("streams", "first", None, None));
        record(row("streams", "second", None, None));
        let figures: Vec<String> = recorded().into_iter().skip(before).map(|r| r.figure).collect();
        assert_eq!(figures, ["first", "second"]);
    }
}

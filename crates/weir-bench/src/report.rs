//! How the benchmarks print their figures: thousands separators, ratios, byte sizes and the
//! verdict beside a target. A missed target is printed, never an error: the command succeeds.

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
#[allow(dead_code)]
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
}

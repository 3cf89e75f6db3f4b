//! Readers of Linux's `/proc`: a process's CPU ticks and parent (`/proc/<pid>/stat`), its
//! memory (`/proc/<pid>/status`), its children, and the machine's busy ticks (`/proc/stat`).
//! See proc(5). Each reader answers `None` (or nothing) for a process that is gone.

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug)]
pub(crate) struct ProcStat {
    pub(crate) comm: String,
    pub(crate) ppid: u32,
    /// utime + stime, in clock ticks.
    pub(crate) ticks: u64,
    /// cutime + cstime (waited-for children), in clock ticks.
    pub(crate) child_ticks: u64,
}

/// `/proc/<pid>/stat` of `pid`, if it (still) exists.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the text of a `/proc/<pid>/stat` (the command name may hold spaces and parentheses).
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state): field k is f[k - 3].
    let num = |k: usize| -> Option<u64> { f.get(k - 3)?.parse().ok() };
    Some(ProcStat {
        comm,
        ppid: num(4)? as u32,
        ticks: num(14)? + num(15)?,
        child_ticks: num(16)? + num(17)?,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot say), asked once.
pub(crate) fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The pids of the children of `pid` (of the postmaster: the server's processes).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        return text.split_whitespace().filter_map(|s| s.parse().ok()).collect();
    }
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| proc_stat(*p).is_some_and(|s| s.ppid == pid))
        .collect()
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Busy clock ticks of all CPUs together: the `cpu` line of `/proc/stat` less idle and iowait.
pub(crate) fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = f.iter().take(8).sum();
    Some(total - f.get(3)? - f.get(4).copied().unwrap_or(0))
}

/// The process title of `pid` (`/proc/<pid>/cmdline`, NULs as spaces), empty when gone.
pub(crate) fn title(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmd).replace('\0', " ").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let s = "123 (post gres) S 7 1 1 0 -1 0 0 0 0 0 50 25 3 4 20 0 1 0 100 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "post gres");
        assert_eq!(st.ppid, 7);
        assert_eq!(st.ticks, 75);
        assert_eq!(st.child_ticks, 7);
    }
}

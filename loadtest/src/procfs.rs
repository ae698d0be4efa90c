//! What /proc says about a process: CPU time and memory.

use anyhow::Context;

/// utime and stime (clock ticks) from the text of a /proc/.../stat file.
pub fn stat_cpu_split(stat: &str) -> Option<(u64, u64)> {
    // Fields after the parenthesised command name, which may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// utime + stime (clock ticks) from the text of a /proc/.../stat file.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    stat_cpu_split(stat).map(|(user, system)| user + system)
}

/// CPU time a process has used so far in user space and in the kernel, in
/// clock ticks (0 once it is gone).
pub fn process_cpu_split(pid: u32) -> (u64, u64) {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .as_deref()
        .and_then(stat_cpu_split)
        .unwrap_or((0, 0))
}

/// CPU time a process has used so far, in clock ticks (0 once it is gone).
pub fn process_cpu_ticks(pid: u32) -> u64 {
    let (user, system) = process_cpu_split(pid);
    user + system
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux in practice).
pub fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident set size of a process now, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The largest resident set size a process has had, in KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

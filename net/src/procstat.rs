//! Resource usage of this process and its threads, read from Linux `/proc`: CPU seconds and
//! resident memory. The comm server and coordinator put it in `/v1/stats` so a load test can
//! charge CPU and memory to a deployed server; the simulation uses the per-thread figures to tell
//! the embedded cluster's CPU from the load generator's inside one process.
//!
//! Every function that reads `/proc` returns `None` where it is missing (not Linux) or
//! unreadable. [`tasks`] counts the live tokio tasks beside them, from the runtime.

use std::path::Path;

/// Kernel clock ticks per second for `utime`/`stime` in `/proc/*/stat`. `USER_HZ` is 100 on every
/// Linux architecture the project builds for, and reading `sysconf` would need `unsafe`.
const TICKS_PER_SECOND: f64 = 100.0;

/// A snapshot of this process's usage.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Usage {
    /// The process id, so a reader can tell which servers share a process.
    pub pid: u32,
    /// User plus system CPU time since the process started, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size now, in bytes.
    pub rss_bytes: u64,
    /// Highest resident set size so far (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
}

/// The tokio tasks alive in the runtime this is called from (0 outside one): a figure that
/// grows without bound when tasks leak.
pub fn tasks() -> usize {
    tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks())
}

/// This process's CPU time and resident memory.
pub fn process() -> Option<Usage> {
    of_process(std::process::id())
}

/// Another process's CPU time (all its threads, including those that exited) and resident
/// memory; `None` once it has exited. A benchmark charges a server's CPU with two readings.
pub fn of_process(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(Usage {
        pid,
        cpu_seconds: parse_stat(&stat)?.1,
        rss_bytes: status_kib(&status, "VmRSS:")? * 1024,
        peak_rss_bytes: status_kib(&status, "VmHWM:")? * 1024,
    })
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix` (threads
/// that already exited are not counted).
pub fn threads_cpu_seconds(prefix: &str) -> Option<f64> {
    let tasks = std::fs::read_dir(Path::new("/proc/self/task")).ok()?;
    let mut total = 0.0;
    for task in tasks.flatten() {
        // A thread can exit between listing and reading; skip it.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, seconds)) = parse_stat(&stat)
            && name.starts_with(prefix)
        {
            total += seconds;
        }
    }
    Some(total)
}

/// Busy and total CPU time of the whole host so far, in clock ticks summed over all CPUs (the
/// `cpu` line of `/proc/stat`; idle and iowait count as not busy). Two readings give how busy
/// the machine was in between, whoever kept it busy.
pub fn host_cpu() -> Option<(u64, u64)> {
    parse_host(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_host(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map_while(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...; guest time is already in user.
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// CPUs this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Parses a `/proc/*/stat` line into the thread or process name and its user + system CPU
/// seconds. The name sits in parentheses and may itself contain spaces or parentheses, so the
/// fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    // After the name: state (field 3), ..., utime (field 14), stime (field 15).
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((name, (utime + stime) as f64 / TICKS_PER_SECOND))
}

/// A `kB` figure from `/proc/*/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "4242 (rm (x) 1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("rm (x) 1", 3.0)));
        assert_eq!(parse_stat("4242 (short) S 1 2"), None);
    }

    #[test]
    fn host_cpu_counts_idle_and_iowait_as_not_busy() {
        let stat = "cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 10 0 5 80 5 0 0 0 0 0\n";
        assert_eq!(parse_host(stat), Some((15, 100)));
        assert_eq!(parse_host("intr 1 2"), None);
    }

    #[test]
    fn status_figures_are_kib() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(status, "VmHWM:"), Some(2048));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_usage() {
        let usage = process().expect("/proc/self is readable on Linux");
        assert!(usage.rss_bytes > 0 && usage.peak_rss_bytes >= usage.rss_bytes);
        assert!(threads_cpu_seconds("").is_some_and(|s| s >= 0.0));
    }
}

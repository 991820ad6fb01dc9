//! What the benchmark reads about a process from `/proc`: resident memory, its anonymous
//! part, and CPU time. Linux only, like the machines the figures come from.
//!
//! Kernel socket buffers are not in a process's RSS; [`tcp_mem_pages`] reads the kernel's
//! own count (system-wide) so a report can say how much the connections cost outside.

use std::time::Duration;

/// `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`, fixed at 100 by the Linux
/// ABI whatever the kernel's internal tick rate.
const USER_HZ: u64 = 100;

/// One reading of a process's memory, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS` from `/proc/<pid>/status`.
    pub rss_kib: u64,
    /// `Anonymous` from `/proc/<pid>/smaps_rollup`: heap and stacks, what connections grow.
    pub anon_kib: u64,
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The memory of `pid`; `None` if the process is gone or `/proc` is unreadable.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Memory {
        rss_kib: field_kib(&status, "VmRSS:")?,
        anon_kib: field_kib(&rollup, "Anonymous:").unwrap_or(0),
    })
}

/// User + system CPU time `pid` has used so far; zero if it cannot be read.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) sit at 11 and 12.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / USER_HZ)
}

/// This process's own id.
pub fn self_pid() -> u32 {
    std::process::id()
}

/// Pages the kernel has allocated to TCP socket buffers, system-wide (`mem` in
/// `/proc/net/sockstat`); `None` if unreadable.
pub fn tcp_mem_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// CPU time of several processes, read together so a window's deltas line up.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    times: Vec<(u32, Duration)>,
}

impl CpuSnapshot {
    /// Reads the CPU time of every pid now.
    pub fn take(pids: &[u32]) -> Self {
        Self {
            times: pids.iter().map(|&p| (p, cpu_time(p))).collect(),
        }
    }

    /// CPU used by `pid` since this snapshot (zero if it was not in it).
    pub fn since(&self, pid: u32) -> Duration {
        self.times
            .iter()
            .find(|(p, _)| *p == pid)
            .map_or(Duration::ZERO, |(_, before)| {
                cpu_time(pid).saturating_sub(*before)
            })
    }
}

/// The processes whose parent is `pid` (`/proc/*/stat`, field 4).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    // After the command name's closing parenthesis: state, then ppid.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let m = memory(self_pid()).expect("/proc/self is readable");
        assert!(m.rss_kib > 0);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_time(self_pid()) > Duration::ZERO);
    }

    #[test]
    fn kib_fields_are_parsed_with_their_unit() {
        assert_eq!(field_kib("VmRSS:\t  1234 kB\n", "VmRSS:"), Some(1234));
        assert_eq!(field_kib("Other: 1 kB\n", "VmRSS:"), None);
    }
}

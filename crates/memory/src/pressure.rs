//! The host's memory as the kernel reports it.

use std::path::Path;

/// Memory pressure and availability.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostMemory {
    /// `some avg10` of `/proc/pressure/memory`: the share of the last 10 s in which some task
    /// waited for memory, in percent (0 where PSI is not available).
    pub some_avg10: f64,
    /// `MemAvailable` of `/proc/meminfo`, in bytes.
    pub available: u64,
    /// `MemTotal`, in bytes.
    pub total: u64,
}

/// Parses `/proc/pressure/memory` text: the `some` line's `avg10`.
pub fn parse_psi(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let v = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?;
    v.parse().ok()
}

/// Parses a `/proc/meminfo` field (`MemAvailable`) in bytes.
pub fn parse_meminfo(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Reads the host's memory state (missing files read as zero).
pub fn read() -> HostMemory {
    read_from(Path::new("/proc"))
}

fn read_from(proc: &Path) -> HostMemory {
    let psi = std::fs::read_to_string(proc.join("pressure/memory")).unwrap_or_default();
    let meminfo = std::fs::read_to_string(proc.join("meminfo")).unwrap_or_default();
    HostMemory {
        some_avg10: parse_psi(&psi).unwrap_or(0.0),
        available: parse_meminfo(&meminfo, "MemAvailable").unwrap_or(0),
        total: parse_meminfo(&meminfo, "MemTotal").unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_and_meminfo_parse() {
        let psi = "some avg10=1.25 avg60=0.50 avg300=0.10 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi(psi), Some(1.25));
        assert_eq!(parse_psi("garbage"), None);
        let mi = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(mi, "MemAvailable"), Some(20_000_000 * 1024));
        assert_eq!(parse_meminfo(mi, "MemTotal"), Some(24_000_000 * 1024));
        assert_eq!(parse_meminfo(mi, "Nope"), None);
    }

    #[test]
    fn this_host_reports_memory() {
        let h = read();
        assert!(h.total > 0 && h.available <= h.total, "{h:?}");
    }
}

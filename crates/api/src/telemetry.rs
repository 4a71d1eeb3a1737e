//! Firecracker's metrics destination (`PUT /metrics`): the instance's counters flushed as JSON
//! lines to a file or a named pipe, on `FlushMetrics` and once a minute. Also the opener that
//! log and metrics destinations share.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rebound_control::Instance;

use crate::models::MetricsConfig;

/// How often configured metrics are flushed without being asked (Firecracker's period).
pub const FLUSH_PERIOD: Duration = Duration::from_secs(60);

/// Opens a log or metrics destination: a regular file (created if missing, appended to) or a
/// named pipe. Never blocks: a pipe is opened read-write and non-blocking (opening it for
/// writing alone would wait for a reader), and anything else (a directory, a device, a socket)
/// is refused.
pub fn open_sink(path: &Path) -> io::Result<File> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_fifo() => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path),
        Ok(m) if !m.is_file() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or a named pipe",
        )),
        _ => OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path),
    }
}

/// Where metrics are flushed, once configured.
#[derive(Default)]
pub struct MetricsFile {
    out: Mutex<Option<File>>,
}

impl MetricsFile {
    fn lock(&self) -> MutexGuard<'_, Option<File>> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the destination (once, as Firecracker allows).
    pub fn configure(&self, c: &MetricsConfig) -> Result<(), String> {
        let mut out = self.lock();
        if out.is_some() {
            return Err(
                "metrics_path: the metrics destination is already set (it can be set once)".into(),
            );
        }
        let f = open_sink(Path::new(&c.metrics_path))
            .map_err(|e| format!("metrics_path: cannot open {}: {e}", c.metrics_path))?;
        *out = Some(f);
        Ok(())
    }

    /// Writes one line of `instance`'s metrics, if a destination is set. A pipe nobody reads
    /// loses the line rather than stalling the VMM.
    pub fn flush(&self, instance: &Instance) -> Result<(), String> {
        let mut out = self.lock();
        let Some(f) = out.as_mut() else {
            return Ok(());
        };
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = serde_json::json!({
            "utc_timestamp_ms": ms,
            "instance": instance.id(),
            "state": instance.state().name(),
            "vm": instance.metrics(),
            "protection": instance.protection().map(|(_, stats)| stats),
        });
        let mut text = line.to_string();
        text.push('\n');
        match f.write_all(text.as_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::warn!("metrics line dropped: nobody reads the metrics pipe");
                Ok(())
            }
            Err(e) => Err(format!("cannot write metrics: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_are_files_or_pipes_and_never_block() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_sink(dir.path()).is_err(), "a directory is refused");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No reader: opening must not wait for one.
        let mut f = open_sink(&fifo).unwrap();
        f.write_all(b"x\n").unwrap();
        let file = dir.path().join("m.json");
        open_sink(&file).unwrap().write_all(b"a\n").unwrap();
        open_sink(&file).unwrap().write_all(b"b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a\nb\n");
    }

    #[test]
    fn metrics_are_set_once_and_flushed_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let m = MetricsFile::default();
        let instance = Instance::new("m", Box::new(io::sink()));
        m.flush(&instance).unwrap();
        let c = MetricsConfig {
            metrics_path: path.display().to_string(),
        };
        m.configure(&c).unwrap();
        assert!(m.configure(&c).is_err());
        m.flush(&instance).unwrap();
        m.flush(&instance).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["state"], "Not started");
    }
}

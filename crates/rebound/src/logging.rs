//! Rebound's own log: stderr by default, reconfigurable at run time (Firecracker's
//! `PUT /logger` and `--log-path`/`--level`/`--module`/`--show-level`/`--show-log-origin`).

use std::fs::File;
use std::sync::Arc;

use rebound_api::models::LoggerConfig;
use tracing_subscriber::layer::{Layer, Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

/// Handles on the installed log, to change it later.
pub struct Logger {
    filter: reload::Handle<EnvFilter, Registry>,
    output: reload::Handle<Output, Filtered>,
}

/// Colour only for a terminal, and not when NO_COLOR is set (https://no-color.org).
fn colour_on_stderr() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
    tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn stderr_output(show_level: bool, origin: bool) -> Output {
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .with_level(show_level)
        .with_file(origin)
        .with_line_number(origin)
        .boxed()
}

fn file_output(file: File, show_level: bool, origin: bool) -> Output {
    tracing_subscriber::fmt::layer()
        .with_writer(Arc::new(file))
        .with_ansi(false)
        .with_level(show_level)
        .with_file(origin)
        .with_line_number(origin)
        .boxed()
}

/// A Firecracker level name (any case) as a filter directive.
pub fn level_directive(level: &str) -> Result<&'static str, String> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "error" => "error",
        "warning" | "warn" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        "off" => "off",
        other => {
            return Err(format!(
                "level: {other:?} is not one of Error, Warning, Info, Debug, Trace, Off"
            ));
        }
    })
}

/// Installs the log at `level` on stderr (RUST_LOG, if set, wins).
pub fn init(level: &str) -> Logger {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, filter_handle) = reload::Layer::new(filter);
    let (output, output_handle) = reload::Layer::new(stderr_output(true, false));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init();
    Logger {
        filter: filter_handle,
        output: output_handle,
    }
}

impl Logger {
    /// Applies a logger configuration; nothing changes if it is refused.
    pub fn apply(&self, c: &LoggerConfig) -> Result<(), String> {
        let level = level_directive(c.level.as_deref().unwrap_or("Warning"))?;
        let directive = match &c.module {
            Some(m)
                if m.is_empty()
                    || !m
                        .chars()
                        .all(|ch| ch.is_alphanumeric() || ch == '_' || ch == ':') =>
            {
                return Err(format!("module: {m:?} is not a module path"));
            }
            Some(m) => format!("off,{m}={level}"),
            None => level.to_string(),
        };
        let filter = EnvFilter::try_new(&directive).map_err(|e| format!("level: {e}"))?;
        let show_level = c.show_level.unwrap_or(true);
        let origin = c.show_log_origin.unwrap_or(false);
        let output = match &c.log_path {
            None => stderr_output(show_level, origin),
            Some(p) => {
                let f = rebound_api::telemetry::open_sink(std::path::Path::new(p))
                    .map_err(|e| format!("log_path: cannot open {p}: {e}"))?;
                file_output(f, show_level, origin)
            }
        };
        self.output
            .reload(output)
            .map_err(|e| format!("cannot change the log: {e}"))?;
        self.filter
            .reload(filter)
            .map_err(|e| format!("cannot change the log level: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_levels_map_to_directives() {
        assert_eq!(level_directive("Warning").unwrap(), "warn");
        assert_eq!(level_directive("DEBUG").unwrap(), "debug");
        assert_eq!(level_directive("off").unwrap(), "off");
        assert!(level_directive("Loud").unwrap_err().starts_with("level:"));
    }
}

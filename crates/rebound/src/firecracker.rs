//! Firecracker's launch flags, so that a client that spawns `firecracker` can be pointed at
//! `rebound`: `--config-file` (configure from Firecracker's JSON and start at once),
//! `--no-api`, the logger and metrics flags, and the jailer's timing flags (accepted).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use rebound_api::config_file::ConfigFile;
use rebound_api::models::{LoggerConfig, MetricsConfig};
use rebound_control::Instance;
use rebound_control::host_faults::{self, HostFaults};

use crate::{Cli, finish, hooks, new_instance, start_api};

/// Firecracker's flags.
#[derive(Args, Debug, Default, Clone)]
#[command(next_help_heading = "Firecracker compatibility")]
pub(crate) struct FirecrackerArgs {
    /// Configure the VM from Firecracker's JSON configuration file and start it at once
    /// (with --api-sock, the API is served too).
    #[arg(long, value_name = "FILE", global = true)]
    pub config_file: Option<PathBuf>,
    /// With --config-file: serve no API.
    #[arg(long, requires = "config_file", global = true)]
    pub no_api: bool,
    /// Rebound's log goes to this file (appended to) or named pipe instead of stderr.
    #[arg(long, value_name = "PATH", global = true)]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off (as --log-level).
    #[arg(long, value_name = "LEVEL", global = true)]
    pub level: Option<String>,
    /// Log only this module's messages (e.g. rebound_checkpoint).
    #[arg(long, value_name = "MODULE", global = true)]
    pub module: Option<String>,
    /// Show each log line's level.
    #[arg(long, global = true)]
    pub show_level: bool,
    /// Show each log line's origin (file and line).
    #[arg(long, global = true)]
    pub show_log_origin: bool,
    /// Flush metrics as JSON lines to this file or named pipe (on FlushMetrics and every
    /// 60 s).
    #[arg(long, value_name = "PATH", global = true)]
    pub metrics_path: Option<PathBuf>,
    /// Refused: Rebound does not install seccomp filters yet.
    #[arg(long, value_name = "PATH", global = true)]
    pub seccomp_filter: Option<PathBuf>,
    /// Accepted (Rebound installs no seccomp filter).
    #[arg(long, global = true, hide = true)]
    pub no_seccomp: bool,
    /// Accepted (launch-to-first-exit time is in the metrics).
    #[arg(long, global = true, hide = true)]
    pub boot_timer: bool,
    /// Accepted from the jailer, unused.
    #[arg(long, value_name = "US", global = true, hide = true)]
    pub start_time_us: Option<u64>,
    /// Accepted from the jailer, unused.
    #[arg(long, value_name = "US", global = true, hide = true)]
    pub start_time_cpu_us: Option<u64>,
    /// Accepted from the jailer, unused.
    #[arg(long, value_name = "US", global = true, hide = true)]
    pub parent_cpu_time_us: Option<u64>,
    /// Accepted; Rebound's API takes bodies up to 64 KiB.
    #[arg(long, value_name = "BYTES", global = true, hide = true)]
    pub http_api_max_payload_size: Option<usize>,
    /// Accepted, unused (Rebound has no MMDS).
    #[arg(long, value_name = "BYTES", global = true, hide = true)]
    pub mmds_size_limit: Option<usize>,
}

impl FirecrackerArgs {
    /// The log configuration the flags ask for, if any.
    pub fn logger(&self) -> Option<LoggerConfig> {
        let any = self.log_path.is_some()
            || self.level.is_some()
            || self.module.is_some()
            || self.show_level
            || self.show_log_origin;
        any.then(|| LoggerConfig {
            log_path: self.log_path.as_ref().map(|p| p.display().to_string()),
            level: self.level.clone(),
            show_level: Some(self.show_level || self.level.is_some()),
            show_log_origin: Some(self.show_log_origin),
            module: self.module.clone(),
        })
    }

    /// Applies the process-level flags: the log, metrics, what is refused.
    pub fn apply(&self, default_level: &str) -> Result<()> {
        if self.seccomp_filter.is_some() {
            bail!("--seccomp-filter: Rebound does not install seccomp filters yet (--no-seccomp)");
        }
        if let Some(max) = self.http_api_max_payload_size
            && max > rebound_api::server_body_limit()
        {
            tracing::warn!(
                "--http-api-max-payload-size {max}: Rebound's API takes bodies up to {} bytes",
                rebound_api::server_body_limit()
            );
        }
        if let Some(mut l) = self.logger() {
            l.level.get_or_insert_with(|| default_level.to_string());
            let logger = hooks().logger.clone().context("no logger")?;
            logger(&l).map_err(anyhow::Error::msg)?;
        }
        if let Some(p) = &self.metrics_path {
            let m = hooks().metrics.clone().context("no metrics destination")?;
            m.configure(&MetricsConfig {
                metrics_path: p.display().to_string(),
            })
            .map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }
}

/// `rebound --config-file FILE`: configures the VM from Firecracker's JSON, starts it, serves
/// the API unless --no-api, and runs until the VM ends.
pub(crate) fn run_config_file(cli: &Cli) -> Result<i32> {
    let path = cli.fc.config_file.clone().unwrap_or_default();
    let file = ConfigFile::read(&path).map_err(anyhow::Error::msg)?;
    let instance = new_instance(&cli.id);
    file.apply(&instance, hooks()).map_err(anyhow::Error::msg)?;
    host_faults::watch(&instance, HostFaults::from_env())?;
    match (&cli.api_sock, cli.fc.no_api) {
        (Some(sock), false) => start_api(sock, instance.clone())?,
        (Some(_), true) => bail!("--no-api and --api-sock: choose one"),
        _ => spawn_metrics_flusher(&instance),
    }
    let t0 = Instant::now();
    instance.start()?;
    let code = finish(&instance, t0, false);
    if let Some(m) = &hooks().metrics {
        let _ = m.flush(&instance);
    }
    code
}

/// Without the API (which flushes configured metrics itself), metrics are flushed here.
fn spawn_metrics_flusher(instance: &Arc<Instance>) {
    let Some(metrics) = hooks().metrics.clone() else {
        return;
    };
    let weak = Arc::downgrade(instance);
    let _ = std::thread::Builder::new()
        .name("rebound-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(rebound_api::telemetry::FLUSH_PERIOD);
                let Some(instance) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = metrics.flush(&instance) {
                    tracing::warn!("{e}");
                }
            }
        });
}

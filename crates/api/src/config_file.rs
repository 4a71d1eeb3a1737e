//! Firecracker's `--config-file`: the whole VM configuration as one JSON document, in
//! Firecracker's layout (`boot-source`, `drives`, `machine-config`, `logger`, `metrics`, ...),
//! applied to an instance through the same typed configuration the API uses.

use std::path::Path;
use std::sync::Arc;

use rebound_control::{BootSourceConfig, DriveConfig, Instance, MachineConfig};
use serde::Deserialize;

use crate::models::{LoggerConfig, MetricsConfig};
use crate::telemetry::MetricsFile;
use crate::{Hooks, parse};

/// A Firecracker configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The guest program.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSourceConfig,
    /// Drives (at most one).
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// Rebound's own log.
    #[serde(default)]
    pub logger: Option<LoggerConfig>,
    /// Where metrics are flushed.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<rebound_net::NetworkInterface>,
    /// Refused if set (no vsock device).
    #[serde(default)]
    pub vsock: Option<serde_json::Value>,
    /// Refused if set (no MMDS).
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    /// Refused if set (no balloon device).
    #[serde(default)]
    pub balloon: Option<serde_json::Value>,
    /// Refused if set (no entropy device).
    #[serde(default)]
    pub entropy: Option<serde_json::Value>,
    /// Refused if set (no CPU templates).
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
}

impl ConfigFile {
    /// Reads and parses `path` (a regular file).
    pub fn read(path: &Path) -> Result<Self, String> {
        rebound_control::config::regular_file(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        let bytes =
            std::fs::read(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        parse::<ConfigFile>(&bytes)
            .map_err(|e| format!("config file {}: {}", path.display(), e.message()))
    }

    /// Configures `instance` (and, through `hooks`, the log and metrics) as the file says;
    /// the first refusal is returned, naming the section.
    pub fn apply(&self, instance: &Instance, hooks: &Hooks) -> Result<(), String> {
        let refused = [
            ("vsock", self.vsock.is_some(), "Rebound has no vsock device"),
            (
                "mmds-config",
                self.mmds_config.is_some(),
                "Rebound has no MMDS",
            ),
            (
                "balloon",
                self.balloon.is_some(),
                "Rebound has no balloon device",
            ),
            (
                "entropy",
                self.entropy.is_some(),
                "Rebound has no entropy device",
            ),
            (
                "cpu-config",
                self.cpu_config.is_some(),
                "Rebound has no CPU templates",
            ),
        ];
        if let Some((name, _, why)) = refused.iter().find(|(_, set, _)| *set) {
            return Err(format!("{name}: not supported: {why}"));
        }
        if let Some(l) = &self.logger {
            let logger = hooks
                .logger
                .as_ref()
                .ok_or("logger: this process cannot configure its log")?;
            logger(l).map_err(|e| format!("logger: {e}"))?;
        }
        if let Some(m) = &self.metrics {
            hooks
                .metrics
                .as_ref()
                .map(Arc::clone)
                .unwrap_or_else(|| Arc::new(MetricsFile::default()))
                .configure(m)
                .map_err(|e| format!("metrics: {e}"))?;
        }
        if let Some(m) = self.machine_config {
            instance
                .set_machine_config(m)
                .map_err(|e| format!("machine-config: {e}"))?;
        }
        instance
            .set_boot_source_config(&self.boot_source)
            .map_err(|e| format!("boot-source: {e}"))?;
        for n in &self.network_interfaces {
            instance
                .set_network_interface(n.clone())
                .map_err(|e| format!("network-interfaces: {e}"))?;
        }
        match self.drives.as_slice() {
            [] => {}
            [d] => instance
                .set_drive(d.clone())
                .map_err(|e| format!("drives: {e}"))?,
            _ => return Err("drives: Rebound VMs have one drive".into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<ConfigFile, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(&p, text).unwrap();
        ConfigFile::read(&p)
    }

    #[test]
    fn firecrackers_layout_is_read_and_applied() {
        let c = parse_text(
            r#"{"boot-source": {"kernel_image_path": "bundled:testguest", "boot_args": "exit 3"},
                "drives": [], "machine-config": {"vcpu_count": 2, "mem_size_mib": 64, "smt": false},
                "network-interfaces": []}"#,
        )
        .unwrap();
        let i = Instance::new("c", Box::new(std::io::sink()));
        c.apply(&i, &Hooks::default()).unwrap();
        assert_eq!(i.machine_config().vcpu_count, 2);
        assert_eq!(
            i.config_view().boot_source.unwrap().boot_args.as_deref(),
            Some("exit 3")
        );
    }

    #[test]
    fn what_rebound_lacks_is_refused_by_section() {
        let base = r#""boot-source": {"kernel_image_path": "bundled:testguest"}"#;
        let i = Instance::new("c", Box::new(std::io::sink()));
        for (extra, want) in [
            (
                r#""network-interfaces": [{"iface_id": "eth0", "tx_rate_limiter": {}}]"#,
                "network-interfaces",
            ),
            (r#""vsock": {"guest_cid": 3}"#, "vsock"),
            (
                r#""machine-config": {"vcpu_count": 0, "mem_size_mib": 64}"#,
                "machine-config: vcpu_count",
            ),
        ] {
            let c = parse_text(&format!("{{{base}, {extra}}}")).unwrap();
            let e = c.apply(&i, &Hooks::default()).unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
        let e =
            parse_text(r#"{"boot-source": {"kernel_image_path": "x"}, "bogus": 1}"#).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        let e = parse_text("[1]").unwrap_err();
        assert!(e.contains("object"), "{e}");
    }
}

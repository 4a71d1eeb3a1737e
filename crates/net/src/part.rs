//! The network part of a VM's controller: the interfaces configured, the backends built for
//! them when the VM is built (passt processes started or re-attached, TAPs opened), and their
//! end with the VM.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rebound_devices::net::{Backend, NicStatsSnapshot};
use rebound_vmm::config::{BackendSlot, NicConfig};
use serde::Serialize;

use crate::config::{DEFAULT_MTU, NetworkInterface, Publish};
use crate::passt::{PasstProcess, default_addressing};
use crate::paths::Paths;
use crate::tap::Tap;
use crate::{Error, Result};

/// What runs for one NIC while the VM lives.
#[derive(Clone, Debug)]
enum Running {
    Passt(PasstProcess),
    Tap,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The network part of an instance.
#[derive(Default)]
pub struct NetPart {
    ifaces: Mutex<Vec<NetworkInterface>>,
    running: Mutex<Vec<Running>>,
}

/// One interface as `GET /network-interfaces` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct InterfaceView {
    /// The configuration.
    #[serde(flatten)]
    pub config: NetworkInterface,
    /// Counters, once the VM runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<NicStatsSnapshot>,
}

impl NetPart {
    /// Adds interface `iface`, or replaces the one with its id (before the VM is built).
    pub fn set(&self, iface: NetworkInterface) -> Result<()> {
        let mut ifaces = lock(&self.ifaces);
        let index = ifaces
            .iter()
            .position(|i| i.iface_id == iface.iface_id)
            .unwrap_or(ifaces.len());
        if index >= rebound_abi::net::MAX_NICS {
            return Err(Error::Config {
                field: "iface_id".into(),
                reason: format!(
                    "a VM has at most {} network interfaces",
                    rebound_abi::net::MAX_NICS
                ),
            });
        }
        iface.validate(index)?;
        let mut next = ifaces.clone();
        if index == next.len() {
            next.push(iface);
        } else {
            next[index] = iface;
        }
        check_distinct(&next)?;
        *ifaces = next;
        Ok(())
    }

    /// The interfaces configured.
    pub fn list(&self) -> Vec<NetworkInterface> {
        lock(&self.ifaces).clone()
    }

    /// Replaces the configuration with what a saved VM had (recovery, snapshot load).
    pub fn restore(&self, ifaces: Vec<NetworkInterface>) -> Result<()> {
        for (i, f) in ifaces.iter().enumerate() {
            f.validate(i)?;
        }
        check_distinct(&ifaces)?;
        *lock(&self.ifaces) = ifaces;
        Ok(())
    }

    /// Builds every interface's backend, its runtime files in `runtime_dir`. A `durable` VM
    /// (one in a state directory, kept there so a VMM that takes it over finds its passt) has
    /// backends that outlive this process; otherwise they end with it, however it ends. On
    /// failure nothing is left running.
    pub fn attach(&self, runtime_dir: &Path, durable: bool) -> Result<Vec<NicConfig>> {
        let ifaces = self.list();
        let mut nics = Vec::new();
        let mut running = Vec::new();
        for (index, f) in ifaces.iter().enumerate() {
            let built = self.build(index, f, runtime_dir, durable);
            match built {
                Ok((backend, r)) => {
                    nics.push(NicConfig {
                        mac: f.mac(index)?,
                        mtu: f.mtu.unwrap_or(DEFAULT_MTU),
                        backend: BackendSlot::new(backend),
                        host: serde_json::to_string(f).unwrap_or_default(),
                    });
                    running.push(r);
                }
                Err(e) => {
                    stop(&running);
                    return Err(e);
                }
            }
        }
        *lock(&self.running) = running;
        Ok(nics)
    }

    fn build(
        &self,
        index: usize,
        f: &NetworkInterface,
        runtime_dir: &Path,
        durable: bool,
    ) -> Result<(Box<dyn Backend>, Running)> {
        let host_err = |e: std::io::Error| Error::Backend {
            what: format!("network interface {}", f.iface_id),
            reason: e.to_string(),
        };
        if let Some(name) = &f.host_dev_name {
            return Ok((Box::new(Tap::open(name).map_err(host_err)?), Running::Tap));
        }
        if !f.paths.is_empty() {
            let mac = f.mac(index)?;
            return Ok((
                Box::new(Paths::open(&f.paths, mac).map_err(host_err)?),
                Running::Tap,
            ));
        }
        let publish = f
            .publish
            .iter()
            .map(|p| Publish::parse(p))
            .collect::<Result<Vec<_>>>()?;
        let p = PasstProcess::at(runtime_dir, index);
        let link = p.start(
            &default_addressing(f.mtu.unwrap_or(DEFAULT_MTU)),
            &publish,
            durable,
        )?;
        Ok((Box::new(link), Running::Passt(p)))
    }

    /// The VM ended: what runs for its interfaces ends too.
    pub fn detach(&self) {
        stop(&std::mem::take(&mut *lock(&self.running)));
        // This process's own runtime directory (not a state directory) goes with it.
        if let Ok(dir) = private_runtime_path() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The interfaces with their counters (`GET /network-interfaces`).
    pub fn view(&self, stats: Vec<NicStatsSnapshot>) -> Vec<InterfaceView> {
        let mut stats = stats.into_iter();
        self.list()
            .into_iter()
            .map(|config| InterfaceView {
                config,
                stats: stats.next(),
            })
            .collect()
    }
}

fn stop(running: &[Running]) {
    for r in running {
        if let Running::Passt(p) = r {
            p.stop();
        }
    }
}

fn check_distinct(ifaces: &[NetworkInterface]) -> Result<()> {
    let macs = ifaces
        .iter()
        .enumerate()
        .map(|(i, f)| Ok((f.mac(i)?, f.mtu.unwrap_or(DEFAULT_MTU))))
        .collect::<Result<Vec<_>>>()?;
    rebound_vmm::config::check_nics(macs.into_iter()).map_err(|e| Error::Config {
        field: "guest_mac".into(),
        reason: e.to_string(),
    })?;
    let mut taps: Vec<&str> = ifaces
        .iter()
        .flat_map(|f| {
            f.host_dev_name
                .iter()
                .map(String::as_str)
                .chain(f.paths.iter().map(|p| p.host_dev_name.as_str()))
        })
        .collect();
    let n = taps.len();
    taps.sort_unstable();
    taps.dedup();
    if taps.len() != n {
        return Err(Error::Config {
            field: "host_dev_name".into(),
            reason: "a TAP device can serve one interface".into(),
        });
    }
    Ok(())
}

/// A runtime directory for a VM's network files when it has no state directory:
/// `$XDG_RUNTIME_DIR/rebound-net-PID` or `/tmp/rebound-net-PID`.
pub fn private_runtime_dir() -> Result<PathBuf> {
    let dir = private_runtime_path()?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::Backend {
        what: "network runtime directory".into(),
        reason: format!("cannot create {}: {e}", dir.display()),
    })?;
    Ok(dir)
}

fn private_runtime_path() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    Ok(base.join(format!("rebound-net-{}", std::process::id())))
}

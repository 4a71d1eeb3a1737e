//! The sharing part: shared regions to attach when the VM is built, and the VM's identity with
//! its persistent cache. Once the VM runs, attach and detach go to it directly.

use std::sync::{Mutex, MutexGuard};

use rebound_vmm::share::{CacheConfig, ShareConfig};
use rebound_vmm::{Vm, VmConfig};
use serde::Serialize;

use crate::{Error, Result};

/// A VM identity, and the persistent cache that goes with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The identity (a name).
    pub name: String,
    /// Its persistent cache: region name and size in MiB.
    pub cache: Option<(String, u64)>,
}

impl Identity {
    /// Checks the names and the cache size.
    pub fn validate(&self) -> Result<()> {
        let check = |what, n: &str| rebound_vmm::share::check_name(what, n);
        check("identity", &self.name)?;
        if let Some((name, size)) = &self.cache {
            check("cache", name)?;
            if *size == 0 || size % 2 != 0 {
                return Err(Error::Invalid {
                    field: "cache",
                    reason: format!("{name}: size {size} MiB must be a non-zero multiple of 2"),
                });
            }
        }
        Ok(())
    }

    /// What the state directory records of it (JSON).
    pub fn record(&self, image_hash: u64) -> String {
        serde_json::json!({
            "identity": self.name,
            "cache": self.cache.as_ref().map(|(name, size_mib)| {
                serde_json::json!({ "name": name, "size_mib": size_mib })
            }),
            "image_hash": format!("{image_hash:016x}"),
        })
        .to_string()
    }
}

#[derive(Default)]
struct Pending {
    shared: Vec<ShareConfig>,
    identity: Option<Identity>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sharing part of an instance.
#[derive(Default)]
pub struct Sharing {
    pending: Mutex<Pending>,
}

impl Sharing {
    /// Adds region `config.name` to attach at start.
    pub fn add(&self, config: ShareConfig) -> Result<()> {
        rebound_vmm::share::check_name("region", &config.name)?;
        let mut p = lock(&self.pending);
        if p.shared.iter().any(|s| s.name == config.name) {
            return Err(Error::Region {
                name: config.name,
                attached: true,
            });
        }
        p.shared.push(config);
        Ok(())
    }

    /// Removes region `name` from those to attach at start.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut p = lock(&self.pending);
        let before = p.shared.len();
        p.shared.retain(|s| s.name != name);
        if p.shared.len() == before {
            return Err(Error::Region {
                name: name.to_string(),
                attached: false,
            });
        }
        Ok(())
    }

    /// Sets the VM's identity and persistent cache.
    pub fn set_identity(&self, identity: Option<Identity>) -> Result<()> {
        if let Some(id) = &identity {
            id.validate()?;
        }
        lock(&self.pending).identity = identity;
        Ok(())
    }

    /// The identity, if set.
    pub fn identity(&self) -> Option<Identity> {
        lock(&self.pending).identity.clone()
    }

    /// Adds the regions and the cache to the VM's configuration.
    pub fn configure(&self, config: &mut VmConfig) {
        let p = lock(&self.pending);
        config.shared = p.shared.clone();
        let image_hash = config.image.hash();
        config.cache = p.identity.as_ref().and_then(|id| {
            id.cache.as_ref().map(|(name, size_mib)| CacheConfig {
                name: name.clone(),
                size_mib: *size_mib,
                identity: id.name.clone(),
                image_hash,
            })
        });
    }

    /// The regions: attached to `vm` if it runs, else configured (`GET /shared`).
    pub fn view(&self, vm: Option<&Vm>) -> serde_json::Value {
        match vm {
            Some(vm) => {
                let c = vm.share_counters();
                let ld =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                serde_json::json!({
                    "regions": vm.shared_regions(),
                    "doorbells": ld(&c.doorbells),
                    "wakeups_sent": ld(&c.wakeups_sent),
                    "wakeups_received": ld(&c.wakeups_received),
                    "recoveries": ld(&c.recoveries),
                })
            }
            None => serde_json::json!({ "configured": lock(&self.pending).shared }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str) -> ShareConfig {
        ShareConfig {
            name: name.into(),
            read_only: false,
        }
    }

    #[test]
    fn regions_are_attached_once_and_detached_by_name() {
        let s = Sharing::default();
        s.add(region("jobs")).unwrap();
        let e = s.add(region("jobs")).unwrap_err();
        assert_eq!(e.to_string(), "region jobs is already attached");
        assert!(s.add(region("bad/name")).is_err());
        s.remove("jobs").unwrap();
        assert_eq!(
            s.remove("jobs").unwrap_err().to_string(),
            "region jobs is not attached"
        );
        assert_eq!(s.view(None), serde_json::json!({ "configured": [] }));
    }

    #[test]
    fn identity_is_checked_and_reaches_the_config() {
        let s = Sharing::default();
        let bad = Identity {
            name: "web1".into(),
            cache: Some(("c".into(), 3)),
        };
        assert!(s.set_identity(Some(bad)).is_err());
        assert_eq!(s.identity(), None);
        let id = Identity {
            name: "web1".into(),
            cache: Some(("web1-cache".into(), 4)),
        };
        s.set_identity(Some(id.clone())).unwrap();
        s.add(region("jobs")).unwrap();
        let mut config = VmConfig {
            vcpu_count: 1,
            mem_size_mib: 64,
            image: rebound_vmm::GuestImage::from_bytes("x", b"abc"),
            boot_args: String::new(),
            disk: None,
            shared: Vec::new(),
            cache: None,
            nics: Vec::new(),
            net_journal: None,
            disk_journal: None,
        };
        s.configure(&mut config);
        assert_eq!(config.shared.len(), 1);
        let cache = config.cache.unwrap();
        assert_eq!((cache.size_mib, cache.identity.as_str()), (4, "web1"));
        assert!(id.record(7).contains("\"image_hash\":\"0000000000000007\""));
    }
}

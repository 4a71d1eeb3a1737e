//! The VM configuration, validated once at the edge; errors name the field at fault.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rebound_arch::Layout;
use rebound_arch::layout::{MAX_GIB, MAX_VCPUS};

/// A configuration the VMM refuses, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `vcpu_count` is out of range.
    #[error("vcpu_count: {0} is outside 1..={MAX_VCPUS}")]
    VcpuCount(u32),
    /// `mem_size_mib` is out of range or misaligned.
    #[error("mem_size_mib: {0}")]
    MemSize(String),
    /// The guest image could not be read.
    #[error("cannot read guest image {path}: {reason}")]
    ImageRead {
        /// The path given.
        path: String,
        /// Why.
        reason: String,
    },
    /// `boot_args` is too long.
    #[error("boot_args: {len} bytes is more than the {max} allowed")]
    BootArgs {
        /// Its length.
        len: usize,
        /// The limit.
        max: u64,
    },
    /// A disk setting is invalid.
    #[error("drive: {0}")]
    Disk(String),
    /// A network interface setting is invalid.
    #[error("network interface {index}: {reason}")]
    Nic {
        /// Its position.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// Checks NICs given as (MAC, MTU): how many, unicast and distinct MACs, MTUs in range.
pub fn check_nics(nics: impl Iterator<Item = ([u8; 6], u16)>) -> Result<(), ConfigError> {
    let mut seen: Vec<[u8; 6]> = Vec::new();
    for (index, (mac, mtu)) in nics.enumerate() {
        let fail = |reason: String| Err(ConfigError::Nic { index, reason });
        if index >= rebound_abi::net::MAX_NICS {
            return fail(format!("at most {} NICs", rebound_abi::net::MAX_NICS));
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return fail(format!(
                "guest_mac {} is not a unicast address",
                rebound_devices::net::mac_string(mac)
            ));
        }
        if seen.contains(&mac) {
            return fail(format!(
                "guest_mac {} is used twice",
                rebound_devices::net::mac_string(mac)
            ));
        }
        seen.push(mac);
        if !(68..=rebound_abi::net::MAX_MTU).contains(&mtu) {
            return fail(format!(
                "mtu {mtu} is outside 68..={}",
                rebound_abi::net::MAX_MTU
            ));
        }
    }
    Ok(())
}

/// A guest program (an ELF image) and a name for messages.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// Where it came from (a path or a bundled guest's name).
    pub name: String,
    /// The ELF bytes.
    pub bytes: Arc<[u8]>,
}

impl GuestImage {
    /// A stable hash of the image's bytes (what a persistent cache records as its filler).
    pub fn hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.bytes)
    }

    /// Guest images larger than this are refused before reading (no guest needs more).
    pub const MAX_SIZE: u64 = 1 << 30;

    /// Reads an ELF file.
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::ImageRead {
            path: path.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        if meta.len() > Self::MAX_SIZE {
            return Err(err(format!(
                "{} bytes is larger than the 1 GiB limit",
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            name: path.display().to_string(),
            bytes: bytes.into(),
        })
    }

    /// A guest image held in memory (e.g. bundled in the binary).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Self {
        Self {
            name: name.to_string(),
            bytes: bytes.into(),
        }
    }
}

/// The VM's disk, served through the I/O queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskConfig {
    /// A host file used as the disk image.
    File {
        /// Path on the host.
        path: PathBuf,
        /// Refuse guest writes.
        read_only: bool,
        /// A second file every write also goes to, which takes over if this one fails (see
        /// [`rebound_block::disk`]); created if missing, copied to before it serves reads.
        mirror: Option<PathBuf>,
    },
    /// A zero-filled anonymous disk that disappears with the VMM.
    Scratch {
        /// Size in MiB.
        size_mib: u64,
    },
}

/// The host side of a NIC, handed over once to the VM that is built with it (a backend is a
/// process or a device: it cannot be copied, so configurations share the slot).
#[derive(Clone, Default)]
pub struct BackendSlot(Arc<std::sync::Mutex<Option<Box<dyn rebound_devices::net::Backend>>>>);

impl BackendSlot {
    /// A slot holding `backend`.
    pub fn new(backend: Box<dyn rebound_devices::net::Backend>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(backend))))
    }

    /// Takes the backend out (None if a VM already took it).
    pub fn take(&self) -> Option<Box<dyn rebound_devices::net::Backend>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for BackendSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(b) => write!(f, "{}", b.describe()),
            None => write!(f, "(taken)"),
        }
    }
}

/// A network interface.
#[derive(Clone, Debug)]
pub struct NicConfig {
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The MTU (68 to 9000).
    pub mtu: u16,
    /// Its host side.
    pub backend: BackendSlot,
    /// How the host side was configured (the controller's, opaque here): saved with the VM
    /// so that a VMM taking it over sets the same host side up again.
    pub host: String,
}

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// The guest program.
    pub image: GuestImage,
    /// The guest command line.
    pub boot_args: String,
    /// The disk, if any.
    pub disk: Option<DiskConfig>,
    /// Shared regions to attach.
    pub shared: Vec<crate::share::ShareConfig>,
    /// This VM's persistent cache.
    pub cache: Option<crate::share::CacheConfig>,
    /// Network interfaces.
    pub nics: Vec<NicConfig>,
    /// Where received frames are recorded while protected, for a successor VMM to replay (a
    /// VM in a state directory).
    pub net_journal: Option<std::path::PathBuf>,
    /// Where disk writes held for their checkpoint are journaled, for a successor VMM to
    /// apply (a VM in a state directory).
    pub disk_journal: Option<std::path::PathBuf>,
}

/// Host RAM in bytes, from /proc/meminfo (None if it cannot be read).
pub fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl VmConfig {
    /// Checks every field; returns the memory layout the VM will use.
    pub fn validate(&self) -> Result<Layout, ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        let mib = self.mem_size_mib;
        if mib > MAX_GIB << 10 {
            return Err(ConfigError::MemSize(format!(
                "{mib} MiB is above the maximum of {} MiB",
                MAX_GIB << 10
            )));
        }
        if let Some(host) = host_memory()
            && mib << 20 > host
        {
            return Err(ConfigError::MemSize(format!(
                "{mib} MiB is more than this host's {} MiB of RAM",
                host >> 20
            )));
        }
        let layout = Layout::new(mib << 20, self.vcpu_count)
            .map_err(|e| ConfigError::MemSize(e.to_string()))?
            .with_pool();
        if self.boot_args.len() as u64 > rebound_abi::BOOT_ARGS_MAX {
            return Err(ConfigError::BootArgs {
                len: self.boot_args.len(),
                max: rebound_abi::BOOT_ARGS_MAX,
            });
        }
        check_nics(self.nics.iter().map(|n| (n.mac, n.mtu)))?;
        match &self.disk {
            Some(DiskConfig::Scratch { size_mib }) if *size_mib == 0 || *size_mib > 1 << 20 => {
                return Err(ConfigError::Disk(format!(
                    "scratch disk size {size_mib} MiB is outside 1..=1048576"
                )));
            }
            Some(DiskConfig::File { path, .. }) if path.as_os_str().is_empty() => {
                return Err(ConfigError::Disk("path_on_host is empty".into()));
            }
            _ => {}
        }
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            vcpu_count: 1,
            mem_size_mib: 64,
            image: GuestImage::from_bytes("x", b""),
            boot_args: String::new(),
            disk: None,
            shared: Vec::new(),
            cache: None,
            nics: Vec::new(),
            net_journal: None,
            disk_journal: None,
        }
    }

    #[test]
    fn nics_are_checked() {
        let ok = [2, 0, 0, 0, 0, 1];
        assert!(check_nics([(ok, 1500)].into_iter()).is_ok());
        let e = check_nics([([1, 0, 0, 0, 0, 1], 1500)].into_iter()).unwrap_err();
        assert!(e.to_string().contains("unicast"), "{e}");
        let e = check_nics([(ok, 1500), (ok, 1500)].into_iter()).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = check_nics([(ok, 60)].into_iter()).unwrap_err();
        assert!(e.to_string().starts_with("network interface 0: mtu"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = config();
        c.vcpu_count = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("vcpu_count:")
        );
        let mut c = config();
        c.mem_size_mib = 1 << 30;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("mem_size_mib:")
        );
        let mut c = config();
        c.mem_size_mib = 65;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of 2 MiB")
        );
        let mut c = config();
        c.boot_args = "x".repeat(5000);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("boot_args:")
        );
        assert!(config().validate().is_ok());
    }

    #[test]
    fn too_large_for_the_host_is_refused() {
        let host = host_memory().unwrap();
        let mut c = config();
        c.mem_size_mib = ((host >> 20) + 2) & !1;
        if c.mem_size_mib <= MAX_GIB << 10 {
            assert!(
                c.validate()
                    .unwrap_err()
                    .to_string()
                    .contains("this host's")
            );
        }
    }

    #[test]
    fn unreadable_image_is_reported_with_its_path() {
        let e = GuestImage::from_path(Path::new("/nonexistent/guest.elf")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read guest image"));
        assert!(e.to_string().contains("/nonexistent/guest.elf"));
        let e = GuestImage::from_path(Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"));
    }
}

//! The VM's configuration before it is built (Firecracker's `vmm_config` + `VmResources`):
//! machine, boot source and drive, each a plain type with its own validation and, for the
//! machine, a typed partial update. Every value is checked when it is set, with errors that
//! name the field; the whole is checked again when the VM is built.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rebound_vmm::{DiskConfig, GuestImage, VmConfig};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Huge pages for guest memory (Firecracker's values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal 4 KiB pages.
    #[default]
    None,
    /// 2 MiB huge pages (refused: guest memory is a memfd whose pages the checkpoint engine
    /// tracks one by one).
    #[serde(rename = "2M")]
    TwoMib,
}

/// vCPUs and memory (`PUT /machine-config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1-32).
    pub vcpu_count: u32,
    /// Guest memory in MiB (a multiple of 2, at least 8, at most the host's RAM).
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: only `false` (SDK guests see no SMT).
    #[serde(default)]
    pub smt: bool,
    /// Accepted for compatibility: the checkpoint engine always tracks dirty pages.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Only `None`.
    #[serde(default, skip_serializing_if = "HugePages::is_none")]
    pub huge_pages: HugePages,
}

impl HugePages {
    fn is_none(&self) -> bool {
        *self == HugePages::None
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// A partial machine configuration (`PATCH /machine-config`): absent fields keep their value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    pub vcpu_count: Option<u32>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<u64>,
    /// Must be false.
    pub smt: Option<bool>,
    /// Accepted for compatibility.
    pub track_dirty_pages: Option<bool>,
    /// Must be `None`.
    pub huge_pages: Option<HugePages>,
}

impl MachineConfig {
    /// Checks every field against what Rebound and this host can run.
    pub fn validate(&self) -> Result<()> {
        if self.smt {
            return Err(Error::Invalid {
                field: "smt",
                reason: "simultaneous multithreading is not supported".into(),
            });
        }
        if self.huge_pages != HugePages::None {
            return Err(Error::Invalid {
                field: "huge_pages",
                reason: "only \"None\" is supported".into(),
            });
        }
        self.probe(GuestImage::from_bytes("", b""), String::new())
            .validate()
            .map_err(rebound_vmm::Error::from)?;
        Ok(())
    }

    /// This configuration with `update` applied, validated; `self` is unchanged.
    pub fn update(&self, update: &MachineConfigUpdate) -> Result<MachineConfig> {
        let next = MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: update.smt.unwrap_or(self.smt),
            track_dirty_pages: update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: update.huge_pages.unwrap_or(self.huge_pages),
        };
        next.validate()?;
        Ok(next)
    }

    fn probe(&self, image: GuestImage, boot_args: String) -> VmConfig {
        VmConfig {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            image,
            boot_args,
            disk: None,
            shared: Vec::new(),
            cache: None,
            nics: Vec::new(),
            net_journal: None,
            disk_journal: None,
        }
    }
}

/// The guest program (`PUT /boot-source`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Path of the guest ELF on the host, or `bundled:NAME` for a guest built into Rebound.
    pub kernel_image_path: String,
    /// The guest command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Not supported for SDK guests; refused if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl BootSourceConfig {
    /// Reads the image this names (a file, or a bundled guest) and checks the settings. Does
    /// blocking file I/O: keep it off an event loop.
    pub fn load(&self) -> Result<BootSource> {
        if self.initrd_path.is_some() {
            return Err(Error::Invalid {
                field: "initrd_path",
                reason: "an initrd is not supported for Rebound guests".into(),
            });
        }
        let image = match self.kernel_image_path.strip_prefix("bundled:") {
            Some(name) => match rebound_guests::by_name(name) {
                Some(bytes) => GuestImage::from_bytes(name, bytes),
                None => {
                    return Err(Error::Invalid {
                        field: "kernel_image_path",
                        reason: format!(
                            "no bundled guest named {name:?} (have: {})",
                            rebound_guests::NAMES.join(", ")
                        ),
                    });
                }
            },
            None => GuestImage::from_path(Path::new(&self.kernel_image_path)).map_err(|e| {
                Error::Invalid {
                    field: "kernel_image_path",
                    reason: e.to_string(),
                }
            })?,
        };
        Ok(BootSource {
            image,
            boot_args: self.boot_args.clone().unwrap_or_default(),
            config: Some(self.clone()),
        })
    }
}

/// A guest program ready to boot.
#[derive(Clone, Debug)]
pub struct BootSource {
    /// The ELF image.
    pub image: GuestImage,
    /// The guest command line.
    pub boot_args: String,
    /// The request it came from, if any (what `GET /vm/config` shows).
    pub config: Option<BootSourceConfig>,
}

impl BootSource {
    /// An image given directly (the CLI).
    pub fn new(image: GuestImage, boot_args: String) -> Self {
        Self {
            config: Some(BootSourceConfig {
                kernel_image_path: image.name.clone(),
                boot_args: Some(boot_args.clone()),
                initrd_path: None,
            }),
            image,
            boot_args,
        }
    }

    /// Checks the command line and that the image is a Rebound guest that fits `machine`.
    pub fn validate(&self, machine: &MachineConfig) -> Result<()> {
        let probe = machine.probe(self.image.clone(), self.boot_args.clone());
        let layout = probe.validate().map_err(rebound_vmm::Error::from)?;
        rebound_vmm::boot::check_elf(&self.image.name, &self.image.bytes, &layout).map_err(
            |e| Error::Invalid {
                field: "kernel_image_path",
                reason: e.to_string(),
            },
        )?;
        Ok(())
    }
}

/// A drive (`PUT /drives/{drive_id}`), as Firecracker's `BlockDeviceConfig`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// The drive's id (must equal the id in the path).
    pub drive_id: String,
    /// The disk image on the host.
    pub path_on_host: String,
    /// Accepted for compatibility (Rebound VMs have one disk).
    pub is_root_device: bool,
    /// Refuse guest writes.
    #[serde(default)]
    pub is_read_only: bool,
    /// Accepted for compatibility, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback"; Rebound always honours flushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" or "Async"; Rebound serves the disk from its I/O thread either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Rebound: a second file (e.g. on another file system) every write also goes to; it
    /// takes over, with no failed request, if `path_on_host` fails. Created if missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_path: Option<String>,
}

impl DriveConfig {
    /// Checks the settings and that the image is a regular file (never a pipe or a device
    /// that could block whoever opens it).
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: String| Err(Error::Invalid { field, reason });
        if self.drive_id.is_empty() {
            return invalid("drive_id", "must not be empty".into());
        }
        if self
            .cache_type
            .as_deref()
            .is_some_and(|c| c != "Unsafe" && c != "Writeback")
        {
            return invalid("cache_type", "must be \"Unsafe\" or \"Writeback\"".into());
        }
        if self
            .io_engine
            .as_deref()
            .is_some_and(|c| c != "Sync" && c != "Async")
        {
            return invalid("io_engine", "must be \"Sync\" or \"Async\"".into());
        }
        if let Err(reason) = regular_file(Path::new(&self.path_on_host)) {
            return invalid("path_on_host", format!("{}: {reason}", self.path_on_host));
        }
        if let Some(m) = &self.mirror_path {
            if self.is_read_only {
                return invalid("mirror_path", "a read-only drive is not mirrored".into());
            }
            if Path::new(m).exists()
                && let Err(reason) = regular_file(Path::new(m))
            {
                return invalid("mirror_path", format!("{m}: {reason}"));
            }
            if Path::new(m) == Path::new(&self.path_on_host) {
                return invalid("mirror_path", "must differ from path_on_host".into());
            }
        }
        Ok(())
    }

    /// The disk the VM gets.
    pub fn disk(&self) -> DiskConfig {
        DiskConfig::File {
            path: PathBuf::from(&self.path_on_host),
            read_only: self.is_read_only,
            mirror: self.mirror_path.as_ref().map(PathBuf::from),
        }
    }
}

/// Checks that `path` names a regular file (following symlinks), without opening it: opening
/// a FIFO blocks until a writer comes.
pub fn regular_file(path: &Path) -> std::result::Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("the path is empty".into());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => Err("is a directory, not a file".into()),
        Ok(_) => Err("is not a regular file (a pipe, socket or device)".into()),
        Err(e) => Err(crate::io_reason(&e)),
    }
}

#[derive(Default)]
struct Pending {
    machine: MachineConfig,
    boot: Option<BootSource>,
    disk: Option<DiskConfig>,
    drive: Option<DriveConfig>,
}

/// The configuration part of an instance: what the VM will be built from.
#[derive(Default)]
pub struct Resources {
    pending: Mutex<Pending>,
}

/// The configuration as given (`GET /vm/config`).
#[derive(Clone, Debug, Serialize)]
pub struct ConfigView {
    /// The machine.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    /// The boot source, once set.
    #[serde(rename = "boot-source", skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSourceConfig>,
    /// The drives.
    pub drives: Vec<DriveConfig>,
}

impl Resources {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The machine configuration.
    pub fn machine(&self) -> MachineConfig {
        self.lock().machine
    }

    /// Replaces the machine configuration (validated; a boot source already set must still
    /// fit).
    pub fn set_machine(&self, m: MachineConfig) -> Result<()> {
        m.validate()?;
        let mut p = self.lock();
        if let Some(boot) = &p.boot {
            boot.validate(&m)?;
        }
        p.machine = m;
        Ok(())
    }

    /// Applies a partial update to the machine configuration.
    pub fn update_machine(&self, u: &MachineConfigUpdate) -> Result<MachineConfig> {
        let next = self.machine().update(u)?;
        self.set_machine(next)?;
        Ok(next)
    }

    /// Sets the guest program (validated against the machine configuration).
    pub fn set_boot(&self, boot: BootSource) -> Result<()> {
        let mut p = self.lock();
        boot.validate(&p.machine)?;
        p.boot = Some(boot);
        Ok(())
    }

    /// Sets the disk directly (the CLI; a scratch disk is possible).
    pub fn set_disk(&self, disk: Option<DiskConfig>) {
        let mut p = self.lock();
        p.disk = disk;
        p.drive = None;
    }

    /// Sets the drive (the API). Rebound VMs have one drive: another id is refused.
    pub fn set_drive(&self, d: DriveConfig) -> Result<()> {
        d.validate()?;
        let mut p = self.lock();
        if let Some(other) = p.drive.as_ref().filter(|o| o.drive_id != d.drive_id) {
            return Err(Error::Invalid {
                field: "drive_id",
                reason: format!(
                    "Rebound VMs have one drive, and {:?} is already configured",
                    other.drive_id
                ),
            });
        }
        p.disk = Some(d.disk());
        p.drive = Some(d);
        Ok(())
    }

    /// The drive configured through the API, if any.
    pub fn drive(&self) -> Option<DriveConfig> {
        self.lock().drive.clone()
    }

    /// The configuration as given.
    pub fn view(&self) -> ConfigView {
        let p = self.lock();
        ConfigView {
            machine_config: p.machine,
            boot_source: p.boot.as_ref().and_then(|b| b.config.clone()),
            drives: p.drive.iter().cloned().collect(),
        }
    }

    /// What the VM is built from, checked as a whole.
    pub fn vm_config(&self) -> Result<VmConfig> {
        let p = self.lock();
        let boot = p
            .boot
            .as_ref()
            .ok_or(Error::Missing("no boot source: PUT /boot-source first"))?;
        boot.validate(&p.machine)?;
        let mut config = p.machine.probe(boot.image.clone(), boot.boot_args.clone());
        config.disk = p.disk.clone();
        if let Some(DiskConfig::File { path, .. }) = &config.disk {
            regular_file(path).map_err(|reason| Error::Invalid {
                field: "drive",
                reason: format!("cannot open disk image {}: {reason}", path.display()),
            })?;
        }
        config.validate().map_err(rebound_vmm::Error::from)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(args: &str) -> BootSource {
        BootSourceConfig {
            kernel_image_path: "bundled:testguest".into(),
            boot_args: Some(args.into()),
            initrd_path: None,
        }
        .load()
        .unwrap()
    }

    #[test]
    fn machine_errors_name_the_field() {
        let ok = MachineConfig::default();
        assert!(ok.validate().is_ok());
        let e = |m: MachineConfig| m.validate().unwrap_err().to_string();
        assert!(e(MachineConfig { smt: true, ..ok }).starts_with("smt:"));
        assert!(
            e(MachineConfig {
                huge_pages: HugePages::TwoMib,
                ..ok
            })
            .starts_with("huge_pages:")
        );
        assert!(
            e(MachineConfig {
                vcpu_count: 0,
                ..ok
            })
            .starts_with("vcpu_count:")
        );
        assert!(
            e(MachineConfig {
                mem_size_mib: 9,
                ..ok
            })
            .starts_with("mem_size_mib:")
        );
    }

    #[test]
    fn an_update_merges_and_a_refused_one_changes_nothing() {
        let r = Resources::default();
        let m = r
            .update_machine(&MachineConfigUpdate {
                vcpu_count: Some(2),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((m.vcpu_count, m.mem_size_mib), (2, 128));
        let before = r.machine();
        assert!(
            r.update_machine(&MachineConfigUpdate {
                mem_size_mib: Some(7),
                vcpu_count: Some(4),
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!(r.machine(), before);
    }

    #[test]
    fn boot_sources_are_checked_when_set() {
        let r = Resources::default();
        let e = BootSourceConfig {
            kernel_image_path: "bundled:nope".into(),
            boot_args: None,
            initrd_path: None,
        }
        .load()
        .unwrap_err();
        assert!(e.to_string().contains("no bundled guest"), "{e}");
        // Not an ELF: refused at PUT /boot-source, not at start.
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho hi\n").unwrap();
        let b = BootSourceConfig {
            kernel_image_path: junk.display().to_string(),
            boot_args: None,
            initrd_path: None,
        }
        .load()
        .unwrap();
        let e = r.set_boot(b).unwrap_err();
        assert!(e.to_string().starts_with("kernel_image_path:"), "{e}");
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
        assert!(r.view().boot_source.is_none());
        r.set_boot(bundled("ticks 1")).unwrap();
        assert_eq!(
            r.view().boot_source.unwrap().boot_args.as_deref(),
            Some("ticks 1")
        );
    }

    #[test]
    fn a_fifo_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let d = DriveConfig {
            drive_id: "rootfs".into(),
            path_on_host: fifo.display().to_string(),
            is_root_device: true,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            mirror_path: None,
        };
        let e = d.validate().unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let b = BootSourceConfig {
            kernel_image_path: fifo.display().to_string(),
            boot_args: None,
            initrd_path: None,
        };
        assert!(b.load().is_err());
    }

    #[test]
    fn one_drive_per_vm() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let d = |id: &str| DriveConfig {
            drive_id: id.into(),
            path_on_host: img.display().to_string(),
            is_root_device: true,
            is_read_only: false,
            partuuid: None,
            cache_type: Some("Unsafe".into()),
            io_engine: None,
            mirror_path: None,
        };
        let r = Resources::default();
        r.set_drive(d("a")).unwrap();
        r.set_drive(d("a")).unwrap();
        assert!(
            r.set_drive(d("b"))
                .unwrap_err()
                .to_string()
                .starts_with("drive_id:")
        );
        assert_eq!(r.view().drives.len(), 1);
        let mut bad = d("a");
        bad.io_engine = Some("Turbo".into());
        assert!(
            r.set_drive(bad)
                .unwrap_err()
                .to_string()
                .starts_with("io_engine:")
        );
    }

    #[test]
    fn building_needs_a_boot_source() {
        let r = Resources::default();
        assert!(matches!(r.vm_config(), Err(Error::Missing(_))));
        r.set_boot(bundled("")).unwrap();
        assert_eq!(r.vm_config().unwrap().vcpu_count, 1);
    }
}

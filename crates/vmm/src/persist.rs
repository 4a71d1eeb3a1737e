//! What a VM's saved state is made of, and moving it to and from snapshot files.
//!
//! Sections written (versions in parentheses): `vm` (1) = [`VmDescriptor`], `components` (1) =
//! every component's state by id ([`crate::components`]); memory is the file's memory image.
//! Files written before components were keyed by id hold `vcpus` (1), `devices` (1) and
//! `shared` (1) sections instead; they are read into the same map. A newer Rebound must keep
//! reading these versions; a change to an encoding bumps its version (see `docs/checkpoint.md`).

use std::path::{Path, PathBuf};

use rebound_devices::ioq::IoqState;
use rebound_snapshot::component::{self, ComponentStates};
use rebound_snapshot::format::{self, SectionData, section};
use rebound_snapshot::state::VcpuState;
use rebound_snapshot::{Kind, PAGE_SIZE, Snapshot, SnapshotMeta};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::components::{ClockState, ids};
use crate::memory::{self, GuestMemory};
use crate::vm::{Frozen, Vm};
use crate::{Error, Result};

/// Section versions this build writes and reads.
const VM_VERSION: u32 = 1;
const COMPONENTS_VERSION: u32 = 1;
/// Versions of the sections older files hold instead of `components`.
const VCPUS_VERSION: u32 = 1;
const DEVICES_VERSION: u32 = 1;
const SHARED_VERSION: u32 = 1;
/// Section kind of the shared regions attached (files before `components`; optional).
pub const SHARED_SECTION: u32 = section::SHARED;
/// Section kind of every component's state by id.
pub const COMPONENTS_SECTION: u32 = section::COMPONENTS;
/// Version of the `disk` section ([`DiskImage`]).
const DISK_VERSION: u32 = 1;

/// A snapshot whose disk contents are saved beside it (`<snapshot>.disk`, see
/// [`rebound_block::image`]) has this section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    /// The disk's size in bytes.
    pub size: u64,
    /// Blocks the image stores (a diff: those written since the previous image).
    pub blocks: u64,
}

/// The VM as configured: enough to rebuild it around restored memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescriptor {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest image's name (its bytes are in memory).
    pub image: String,
    /// The guest command line.
    pub boot_args: String,
    /// The disk.
    pub disk: Option<DiskDescriptor>,
    /// ABI version the guest was booted with.
    pub abi_version: u32,
}

/// The disk a VM had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskDescriptor {
    /// A host file: reopened on restore (its contents are the user's to keep consistent)
    /// unless the snapshot saved them (on request).
    File {
        /// Path.
        path: PathBuf,
        /// Read-only.
        read_only: bool,
        /// Size in bytes when the snapshot was taken.
        size: u64,
    },
    /// An anonymous scratch disk (its contents are saved with each snapshot of the VM).
    Scratch {
        /// Size in bytes.
        size: u64,
    },
}

/// Device and VM-wide state as files before `components` stored it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LegacyDevicesState {
    ioq: IoqState,
    clock_ns: u64,
    generation: u64,
}

/// A whole VM's state except memory: its description and every component's state.
#[derive(Clone, Debug)]
pub struct SavedState {
    /// Configuration.
    pub vm: VmDescriptor,
    /// Every component's state, by id ([`crate::components::ids`]).
    pub components: ComponentStates,
}

impl SavedState {
    /// The sections that store it.
    pub fn sections(&self) -> Result<Vec<SectionData>> {
        Ok(vec![
            SectionData::encode(section::VM, VM_VERSION, &self.vm)?,
            SectionData::encode(COMPONENTS_SECTION, COMPONENTS_VERSION, &self.components)?,
        ])
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, id: &str, version: u32) -> Result<T> {
        Ok(component::decode(&self.components, id, version)?)
    }

    /// Every vCPU's state.
    pub fn vcpus(&self) -> Result<Vec<VcpuState>> {
        self.decode(ids::VCPUS, 1)
    }

    /// The I/O queue's state.
    pub fn ioq(&self) -> Result<IoqState> {
        self.decode(ids::IOQ, 1)
    }

    /// The guest clock and generation.
    pub fn clock(&self) -> Result<ClockState> {
        self.decode(ids::CLOCK, 1)
    }

    /// What the guest's `GENERATION` returned.
    pub fn generation(&self) -> Result<u64> {
        Ok(self.clock()?.generation)
    }

    /// The network devices' state, if the VM has any.
    pub fn net(&self) -> Result<Option<rebound_devices::net::NetState>> {
        if self.components.contains_key(ids::NET) {
            self.decode(ids::NET, 1).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The memory class table's registration (ABI 1.8), if the guest made one.
    pub fn memory_table(&self) -> Result<Option<crate::reclaim::TableState>> {
        if self.components.contains_key(ids::MEMORY) {
            self.decode(ids::MEMORY, 1).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Programs (ABI 1.10; none in older snapshots).
    pub fn programs(&self) -> Result<Option<crate::program::ProgramsState>> {
        if self.components.contains_key(ids::PROGRAMS) {
            self.decode(ids::PROGRAMS, 1).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Armed sites and copied code pages (ABI 1.10; none in older snapshots).
    pub fn replaced(&self) -> Result<Option<crate::emulate::replace::ReplaceState>> {
        if self.components.contains_key(ids::REPLACED) {
            self.decode(ids::REPLACED, 1).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The shared regions attached (re-attached by name).
    pub fn shared(&self) -> Result<Vec<crate::share::ShareRecord>> {
        self.decode(ids::SHARES, 1)
    }
}

/// What a snapshot write did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// The snapshot's id.
    pub id: u64,
    /// Its parent, for a diff.
    pub parent: Option<u64>,
    /// Full or diff.
    pub kind: String,
    /// Pages stored.
    pub pages: u64,
    /// Bytes of data written.
    pub bytes: u64,
    /// How long the VM was paused, in microseconds.
    pub pause_us: u64,
    /// How long the whole operation took, in microseconds.
    pub total_us: u64,
}

/// Now, in nanoseconds since the Unix epoch.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A new snapshot id: unique enough across processes and time.
pub fn new_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 48)) | 1
}

/// Writes the frozen VM to `path`: a full snapshot (`pages` = None) or a diff holding `pages`.
pub fn write_snapshot(
    frozen: &Frozen<'_>,
    path: &Path,
    meta: &SnapshotMeta,
    pages: Option<&rebound_snapshot::DirtySet>,
    extra: Vec<SectionData>,
) -> Result<format::WriteStats> {
    let mut sections = frozen.state().sections()?;
    sections.extend(extra);
    let page = |p: u64| frozen.page(p).map(|b| (p, b));
    let stats = match pages {
        None => format::write(
            path,
            meta,
            &sections,
            frozen.data_pages().iter().filter_map(page),
        )?,
        Some(set) => format::write(path, meta, &sections, set.iter().filter_map(page))?,
    };
    Ok(stats)
}

impl Vm {
    /// Writes a snapshot of the running VM to `path` (Firecracker's `PUT /snapshot/create`).
    /// A full snapshot turns dirty tracking on, so the next one can be a diff: the pages written
    /// since this one, with this one as its parent. A file-backed disk's contents are not saved
    /// (see [`snapshot_with`](Self::snapshot_with)).
    pub fn snapshot(&self, path: &Path, kind: Kind) -> Result<SnapshotInfo> {
        self.snapshot_with(path, kind, false)
    }

    /// [`snapshot`](Self::snapshot), choosing whether a file-backed disk's contents are saved.
    ///
    /// The disk's contents are saved beside it (`<path>.disk`) when the disk is a scratch disk
    /// or a restored copy-on-write view (they exist nowhere else), and for a file-backed disk
    /// when `with_disk`: in full, or, for a diff whose parent saved them too, the blocks
    /// written since.
    pub fn snapshot_with(&self, path: &Path, kind: Kind, with_disk: bool) -> Result<SnapshotInfo> {
        const CONSUMER: &str = "snapshot-api";
        let t0 = std::time::Instant::now();
        if kind == Kind::Full {
            self.enable_dirty_tracking()?;
        }
        // Everything from the parent's id to recording this snapshot's happens inside one freeze:
        // freezes take turns, so two snapshots cannot both claim the same parent.
        let frozen = self.freeze()?;
        let parent = match kind {
            Kind::Full => None,
            Kind::Diff => Some(self.last_snapshot_id().ok_or_else(|| {
                Error::State("a diff snapshot needs a full snapshot of this VM first".into())
            })?),
        };
        let dirty = self.take_dirty(CONSUMER)?;
        let meta = SnapshotMeta {
            id: new_id(),
            parent,
            epoch: 0,
            kind,
            mem_size: frozen.mem_size(),
            created_unix_ns: unix_ns(),
        };
        let image = match self.save_disk_image(path, &meta, with_disk) {
            Ok(i) => i,
            Err(e) => {
                self.return_dirty(CONSUMER, &dirty);
                return Err(e);
            }
        };
        let extra = match image
            .as_ref()
            .map(|(i, _)| SectionData::encode(section::DISK, DISK_VERSION, i))
        {
            Some(Ok(s)) => vec![s],
            Some(Err(e)) => {
                self.return_dirty(CONSUMER, &dirty);
                self.undo_disk_image(path, image.as_ref());
                return Err(e.into());
            }
            None => Vec::new(),
        };
        let written = write_snapshot(
            &frozen,
            path,
            &meta,
            (kind == Kind::Diff).then_some(&dirty),
            extra,
        );
        let stats = match written {
            Ok(s) => s,
            Err(e) => {
                // The dirty pages were not stored: put them back for the next diff.
                self.return_dirty(CONSUMER, &dirty);
                self.undo_disk_image(path, image.as_ref());
                return Err(e);
            }
        };
        let paused_for = t0.elapsed();
        self.set_last_snapshot_id(meta.id);
        self.set_last_disk_image(image.is_some());
        frozen.thaw()?;
        Ok(SnapshotInfo {
            id: meta.id,
            parent,
            kind: format!("{kind:?}"),
            pages: stats.pages,
            bytes: stats.bytes_written,
            pause_us: paused_for.as_micros() as u64,
            total_us: t0.elapsed().as_micros() as u64,
        })
    }
}

impl Vm {
    /// Saves the disk's contents beside the snapshot at `path` if they are to be saved (see
    /// [`Vm::snapshot`]): a diff image if the last snapshot saved one, else a full one. Returns
    /// the image's record and the blocks it took from the written set (to put back on failure).
    fn save_disk_image(
        &self,
        path: &Path,
        meta: &SnapshotMeta,
        with_disk: bool,
    ) -> Result<Option<(DiskImage, rebound_snapshot::DirtySet)>> {
        let Some(disk) = self.disk() else {
            return Ok(None);
        };
        let file_backed = matches!(disk.disk().origin(), rebound_block::Origin::File(_));
        if file_backed && !with_disk {
            return Ok(None);
        }
        let written = disk.take_written();
        let diff = meta.kind == Kind::Diff && self.last_disk_image();
        let image_meta = SnapshotMeta {
            parent: if diff { meta.parent } else { None },
            ..meta.clone()
        };
        let read = |buf: &mut [u8], at: u64| disk.read_at(buf, at);
        match rebound_block::image::save(
            path,
            &image_meta,
            disk.size(),
            diff.then_some(&written),
            read,
        ) {
            Ok(saved) => Ok(Some((
                DiskImage {
                    size: disk.size(),
                    blocks: saved.blocks,
                },
                written,
            ))),
            Err(e) => {
                disk.return_written(&written);
                Err(e.into())
            }
        }
    }

    fn undo_disk_image(
        &self,
        path: &Path,
        image: Option<&(DiskImage, rebound_snapshot::DirtySet)>,
    ) {
        if let (Some(disk), Some((_, written))) = (self.disk(), image) {
            disk.return_written(written);
            let _ = std::fs::remove_file(rebound_block::image::path_of(path));
        }
    }
}

/// Whether the newest snapshot of a chain carries the disk's contents.
pub fn carries_disk(chain: &[Snapshot]) -> bool {
    chain.last().is_some_and(|s| s.has_section(section::DISK))
}

/// The disk images a validated chain saved: the record of the newest and the images to load
/// (the newest full one, then the diffs after it), or `None` if the newest snapshot saved none.
pub fn disk_images(chain: &[Snapshot]) -> Result<Option<(DiskImage, Vec<Snapshot>)>> {
    let Some(last) = chain.last() else {
        return Ok(None);
    };
    if !last.has_section(section::DISK) {
        return Ok(None);
    }
    let record: DiskImage = last.decode(section::DISK, DISK_VERSION)?;
    let mut images: Vec<Snapshot> = Vec::new();
    for s in chain.iter().rev() {
        if !s.has_section(section::DISK) {
            let after = images.last().map_or_else(|| last.path(), |i| i.path());
            return Err(Error::Restore(format!(
                "{} saves the disk as a diff of {}, which saved no disk",
                after.display(),
                s.path().display()
            )));
        }
        let image = rebound_block::image::open(s, format::Verify::Full)?;
        let full = image.meta().kind == Kind::Full;
        images.push(image);
        if full {
            break;
        }
    }
    images.reverse();
    Ok(Some((record, images)))
}

/// The disk a validated chain saved, as a copy-on-write view (see [`disk_images`]).
pub fn load_disk(chain: &[Snapshot], read_only: bool) -> Result<Option<rebound_block::Disk>> {
    match disk_images(chain)? {
        None => Ok(None),
        Some((record, images)) => Ok(Some(rebound_block::image::load(
            &images,
            record.size,
            read_only,
        )?)),
    }
}

/// Merges a chain's disk images into one full image for the merged snapshot `out` (whose id
/// is `id`); writes nothing if the chain saved no disk. Call before writing `out` itself.
pub fn merge_disk(chain: &[Snapshot], out: &Path, id: u64) -> Result<bool> {
    match disk_images(chain)? {
        None => Ok(false),
        Some((_, images)) => {
            format::merge(&images, &rebound_block::image::path_of(out), id)?;
            Ok(true)
        }
    }
}

/// Reads the state of a validated chain (from its newest snapshot) and checks it is coherent.
pub fn read_chain(chain: &[Snapshot]) -> Result<SavedState> {
    format::check_chain(chain)?;
    let last = chain
        .last()
        .ok_or_else(|| Error::Restore("no snapshot given".into()))?;
    let vm: VmDescriptor = last.decode(section::VM, VM_VERSION)?;
    let components = if last.has_section(COMPONENTS_SECTION) {
        last.decode(COMPONENTS_SECTION, COMPONENTS_VERSION)?
    } else {
        legacy_components(last)?
    };
    let state = SavedState { vm, components };
    let (vm, vcpus) = (&state.vm, state.vcpus()?);
    if vm.mem_size != last.meta().mem_size {
        return Err(Error::Restore(format!(
            "{}: the vm section says {} bytes of memory, the header {}",
            last.path().display(),
            vm.mem_size,
            last.meta().mem_size
        )));
    }
    if vcpus.len() != vm.vcpus as usize {
        return Err(Error::Restore(format!(
            "{}: {} vCPU states for {} vCPUs",
            last.path().display(),
            vcpus.len(),
            vm.vcpus
        )));
    }
    if vm.abi_version >> 16 != rebound_abi::ABI_MAJOR {
        return Err(Error::Restore(format!(
            "{}: the guest uses ABI {}.{}; this Rebound provides {}.{}",
            last.path().display(),
            vm.abi_version >> 16,
            vm.abi_version & 0xffff,
            rebound_abi::ABI_MAJOR,
            rebound_abi::ABI_MINOR
        )));
    }
    Ok(state)
}

/// The components of a file from before they were keyed by id (its `vcpus`, `devices` and
/// optional `shared` sections), as this build keys them.
fn legacy_components(snap: &Snapshot) -> Result<ComponentStates> {
    let vcpus: Vec<VcpuState> = snap.decode(section::VCPUS, VCPUS_VERSION)?;
    let devices: LegacyDevicesState = snap.decode(section::DEVICES, DEVICES_VERSION)?;
    let shared: Vec<crate::share::ShareRecord> = if snap.has_section(SHARED_SECTION) {
        snap.decode(SHARED_SECTION, SHARED_VERSION)?
    } else {
        Vec::new()
    };
    let clock = ClockState {
        clock_ns: devices.clock_ns,
        generation: devices.generation,
    };
    let mut c = ComponentStates::new();
    c.insert(ids::VCPUS.into(), component::encode(ids::VCPUS, 1, &vcpus)?);
    c.insert(
        ids::IOQ.into(),
        component::encode(ids::IOQ, 1, &devices.ioq)?,
    );
    c.insert(ids::CLOCK.into(), component::encode(ids::CLOCK, 1, &clock)?);
    c.insert(
        ids::SHARES.into(),
        component::encode(ids::SHARES, 1, &shared)?,
    );
    Ok(c)
}

/// Most separate ranges of zero pages mapped over a snapshot's image; past it they are read
/// and checked instead (a file copied without its holes), which costs reading them once.
const MAX_ZERO_MAPS: usize = 1024;

/// Guest memory for a validated chain: the full snapshot mapped copy-on-write, each diff's pages
/// written over it in order.
///
/// The guest sees only bytes a checksum covers: pages the full snapshot does not store read as
/// zero from the kernel (the file's holes), and where the file holds unchecked bytes for them
/// (opened with `Verify::Metadata`), zero pages are mapped there instead of the file.
pub fn map_chain(chain: &[Snapshot], mem_size: u64) -> Result<(GuestMemory, memory::Backing)> {
    let base = chain
        .first()
        .ok_or_else(|| Error::Restore("no snapshot given".into()))?;
    let (file, offset) = base.memory_file();
    let (mem, keep) = memory::map_private(file, offset, mem_size)?;
    let stray = base.unchecked_hole_data();
    if stray.len() > MAX_ZERO_MAPS {
        base.verify_holes()?;
    } else {
        for &(first, count) in stray {
            memory::map_zero(&mem, first, count)?;
        }
    }
    let mut buf = Vec::new();
    for diff in &chain[1..] {
        for run in diff.runs() {
            buf.resize((run.count * PAGE_SIZE) as usize, 0);
            diff.read_memory(run.first * PAGE_SIZE, &mut buf)?;
            mem.write_slice(&buf, GuestAddress(run.first * PAGE_SIZE))
                .map_err(|e| Error::Memory(e.to_string()))?;
        }
    }
    // Those writes are the restore's, not the guest's: start tracking from a clean slate.
    for region in vm_memory::GuestMemoryBackend::iter(&mem) {
        vm_memory::mmap::MmapRegion::bitmap(&**region).reset();
    }
    Ok((mem, keep))
}

impl Frozen<'_> {
    /// Puts this VM back into the state a snapshot chain of it holds, in place: memory (pages
    /// that hold data now but not in the snapshot are zeroed), vCPUs and devices. The chain must
    /// be validated and describe this VM (same memory size and vCPUs).
    pub fn rewind(&self, chain: &[Snapshot]) -> Result<()> {
        // Everything is checked before memory is touched; after that only a read error of an
        // already verified file can fail, and then the VM is ended (its memory is half-written).
        let state = check_rewind(self.vm(), chain)?;
        if let Err(e) = self.rewind_memory(chain) {
            self.vm().fail(format!("rollback failed half-way: {e}"));
            return Err(e);
        }
        self.restore_state(&state)
    }

    fn rewind_memory(&self, chain: &[Snapshot]) -> Result<()> {
        let mut stored = rebound_snapshot::DirtySet::new(self.mem_size() / PAGE_SIZE);
        for s in chain {
            for r in s.runs() {
                for p in r.first..r.first + r.count {
                    stored.insert(p);
                }
            }
        }
        let zero = vec![0u8; PAGE_SIZE as usize];
        for p in self.data_pages().iter().filter(|&p| !stored.contains(p)) {
            self.write_memory(p * PAGE_SIZE, &zero)?;
        }
        let mut buf = Vec::new();
        for s in chain {
            for r in s.runs() {
                buf.resize((r.count * PAGE_SIZE) as usize, 0);
                s.read_memory(r.first * PAGE_SIZE, &mut buf)?;
                self.write_memory(r.first * PAGE_SIZE, &buf)?;
            }
        }
        Ok(())
    }
}

/// Checks that a validated chain is a state of `vm` (same memory size and vCPUs, state that
/// fits its devices) and returns that state. Nothing is changed.
pub fn check_rewind(vm: &Vm, chain: &[Snapshot]) -> Result<SavedState> {
    let state = read_chain(chain)?;
    let d = vm.descriptor();
    if state.vm.mem_size != d.mem_size || state.vm.vcpus != d.vcpus {
        return Err(Error::Restore(format!(
            "the snapshot is of a VM with {} MiB and {} vCPUs; this one has {} MiB and {} vCPUs",
            state.vm.mem_size >> 20,
            state.vm.vcpus,
            d.mem_size >> 20,
            d.vcpus
        )));
    }
    vm.check_state(&state)?;
    Ok(state)
}

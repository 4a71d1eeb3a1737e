//! A disk's contents saved with a snapshot: a second file beside it, `<snapshot>.disk`, in the
//! snapshot format, whose "memory" is the disk in 4 KiB blocks (the last one zero-padded). It
//! carries the snapshot's id, so a disk image is never paired with another snapshot, and gets
//! the format's checks: CRC32C of the header, xxh3 of every stored run, zeros everywhere else.
//!
//! A full image stores every non-zero block; a diff stores the blocks written since the
//! previous image, with that image's id as its parent. A restored disk is a copy-on-write view:
//! the full image mapped private (nothing is copied, clones share its pages, and what a VM
//! writes never reaches the file), the diffs' blocks written over it.

use std::io;
use std::path::{Path, PathBuf};

use rebound_snapshot::format::{self, Verify};
use rebound_snapshot::{DirtySet, Kind, PAGE_SIZE, Snapshot, SnapshotMeta};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::{Disk, Error};

/// Bytes read from the disk per step of a full save.
const SAVE_CHUNK: usize = 1 << 20;

/// Where the disk image of the snapshot at `snapshot` is.
pub fn path_of(snapshot: &Path) -> PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".disk");
    PathBuf::from(p)
}

/// The image's "memory size": the disk rounded up to whole blocks.
pub fn image_size(disk_size: u64) -> u64 {
    disk_size.next_multiple_of(PAGE_SIZE)
}

/// What a save wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// Blocks stored.
    pub blocks: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Saves a disk of `size` bytes, which `read(buf, offset)` reads as the guest sees it, as the
/// image of the snapshot `meta` describes (its id, parent and kind; its memory size is set
/// here): with `blocks = None` every non-zero block, else the blocks listed.
pub fn save(
    snapshot: &Path,
    meta: &SnapshotMeta,
    size: u64,
    blocks: Option<&DirtySet>,
    read: impl Fn(&mut [u8], u64) -> io::Result<()>,
) -> Result<Saved, Error> {
    let meta = SnapshotMeta {
        mem_size: image_size(size),
        kind: if blocks.is_some() {
            Kind::Diff
        } else {
            Kind::Full
        },
        ..meta.clone()
    };
    let mut w = format::Writer::create(&path_of(snapshot), &meta, &[])?;
    let block = PAGE_SIZE as usize;
    let mut buf = vec![0u8; SAVE_CHUNK];
    match blocks {
        None => {
            let mut at = 0u64;
            while at < size {
                let len = SAVE_CHUNK.min((size - at) as usize);
                buf[len..].fill(0);
                read(&mut buf[..len], at)?;
                for (i, b) in buf[..len.next_multiple_of(block)].chunks(block).enumerate() {
                    w.page(at / PAGE_SIZE + i as u64, b)?;
                }
                at += len as u64;
            }
        }
        Some(set) => {
            for p in set.iter().filter(|&p| p * PAGE_SIZE < size) {
                let len = block.min((size - p * PAGE_SIZE) as usize);
                buf[..block].fill(0);
                read(&mut buf[..len], p * PAGE_SIZE)?;
                w.page(p, &buf[..block])?;
            }
        }
    }
    let stats = w.finish()?;
    Ok(Saved {
        blocks: stats.pages,
        bytes: stats.bytes_written,
    })
}

/// Opens and validates the disk image of `snapshot`, which must be its own (same id).
pub fn open(snapshot: &Snapshot, verify: Verify) -> Result<Snapshot, Error> {
    let path = path_of(snapshot.path());
    let image = Snapshot::open(&path, verify)?;
    if image.meta().id != snapshot.meta().id {
        return Err(Error::Image(format!(
            "{} belongs to snapshot {:016x}, not to {} ({:016x})",
            path.display(),
            image.meta().id,
            snapshot.path().display(),
            snapshot.meta().id
        )));
    }
    Ok(image)
}

/// A disk of `size` bytes from validated images: a full one, then diffs of it in order.
pub fn load(images: &[Snapshot], size: u64, read_only: bool) -> Result<Disk, Error> {
    format::check_chain(images)?;
    let base = images
        .first()
        .ok_or_else(|| Error::Image("no disk image given".into()))?;
    for i in images {
        if i.meta().mem_size != image_size(size) {
            return Err(Error::Image(format!(
                "{} holds {} bytes; the disk is {size} bytes",
                i.path().display(),
                i.meta().mem_size
            )));
        }
    }
    if !base.unchecked_hole_data().is_empty() {
        // Bytes the image does not store must read as zero: check them once (a copied file
        // that lost its holes) rather than map them.
        base.verify_holes()?;
    }
    let (file, offset) = base.memory_file();
    let len = image_size(size) as usize;
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(file.try_clone()?, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| Error::Image(format!("cannot map {len} bytes of disk image: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| Error::Image("disk image mapping overflows".into()))?;
    let mem =
        GuestMemoryMmap::from_regions(vec![region]).map_err(|e| Error::Image(e.to_string()))?;
    let mut buf = Vec::new();
    for diff in &images[1..] {
        for run in diff.runs() {
            buf.resize((run.count * PAGE_SIZE) as usize, 0);
            diff.read_memory(run.first * PAGE_SIZE, &mut buf)?;
            mem.write_slice(&buf, GuestAddress(run.first * PAGE_SIZE))
                .map_err(|e| Error::Image(e.to_string()))?;
        }
    }
    Ok(Disk::view(mem, size, read_only))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u64, parent: Option<u64>) -> SnapshotMeta {
        SnapshotMeta {
            id,
            parent,
            epoch: 0,
            kind: Kind::Full,
            mem_size: 0,
            created_unix_ns: 1,
        }
    }

    #[test]
    fn a_saved_disk_comes_back_as_a_private_view_and_diffs_hold_only_written_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let size = 10 * 4096 + 512;
        let d = Disk::scratch(size).unwrap();
        d.write_at(&[1; 512], 0).unwrap();
        d.write_at(&[2; 512], size - 512).unwrap();
        let s1 = tmp.path().join("s1");
        let r = |b: &mut [u8], o| d.read_at(b, o);
        let full = save(&s1, &meta(11, None), size, None, r).unwrap();
        assert_eq!(full.blocks, 2, "zero blocks are not stored");
        d.write_at(&[3; 512], 4096 * 3).unwrap();
        let mut written = DirtySet::new(image_size(size) / PAGE_SIZE);
        written.insert(3);
        let s2 = tmp.path().join("s2");
        let diff = save(&s2, &meta(12, Some(11)), size, Some(&written), r).unwrap();
        assert_eq!(diff.blocks, 1);

        // The images need the snapshots they belong to; stand-ins with the same ids do.
        for (p, id, parent) in [(&s1, 11, None), (&s2, 12, Some(11))] {
            let m = SnapshotMeta {
                kind: if parent.is_some() {
                    Kind::Diff
                } else {
                    Kind::Full
                },
                mem_size: 4096,
                ..meta(id, parent)
            };
            format::write(p, &m, &[], std::iter::empty()).unwrap();
        }
        let snaps: Vec<_> = [&s1, &s2]
            .iter()
            .map(|p| Snapshot::open(p, Verify::Full).unwrap())
            .collect();
        let images: Vec<_> = snaps
            .iter()
            .map(|s| open(s, Verify::Full).unwrap())
            .collect();
        let v = load(&images, size, false).unwrap();
        let mut buf = vec![0u8; size as usize];
        v.read_at(&mut buf, 0).unwrap();
        let mut want = vec![0u8; size as usize];
        d.read_at(&mut want, 0).unwrap();
        assert!(buf == want);
        // Writes to the view stay in this process.
        v.write_at(&[9; 512], 0).unwrap();
        let again = load(&images, size, false).unwrap();
        let mut b = [0u8; 512];
        again.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 512]);

        // An image of another snapshot is refused.
        std::fs::copy(path_of(&s1), path_of(&s2)).unwrap();
        let Err(e) = open(&snaps[1], Verify::Full) else {
            panic!("another snapshot's image was accepted");
        };
        assert!(e.to_string().contains("belongs to snapshot"), "{e}");
        // A damaged byte is found.
        let p = path_of(&s1);
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.iter().rposition(|&x| x == 2).unwrap();
        bytes[at] = 5;
        std::fs::write(&p, bytes).unwrap();
        assert!(open(&snaps[0], Verify::Full).is_err());
    }
}

//! Loading an SDK guest: the ELF is checked against the layout before anything is written
//! (linux-loader, which does the loading, trusts segment addresses), then the system structures
//! and the boot info page are written.

use std::io::Cursor;

use linux_loader::loader::{Elf, KernelLoader};
use rebound_abi::{
    ABI_MAJOR, ABI_MINOR, ABI_VERSION, BOOT_ARGS_OFFSET, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo,
    IMAGE_BASE, PAGE_SIZE, note,
};
use rebound_arch::Layout;
use rebound_arch::layout::VCPU_PAGES;
use vm_memory::GuestAddress;

use crate::memory::GuestMemory;

/// Why a guest image was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Not an ELF file Rebound can run.
    #[error("guest image {name} is not a valid ELF executable: {reason}")]
    NotElf {
        /// Image name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An ELF file that is not a Rebound guest (built for an operating system, or without the
    /// SDK), or one built for another major ABI version.
    #[error(
        "guest image {name} is not a Rebound guest: {reason}; guests are built against the \
         rebound-guest SDK (`rebound new NAME` creates one, see docs/guest-sdk.md)"
    )]
    NotAGuest {
        /// Image name.
        name: String,
        /// What it is instead.
        reason: String,
    },
    /// A segment does not fit in guest memory.
    #[error("guest image {name}: {reason}")]
    BadSegment {
        /// Image name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// linux-loader refused it.
    #[error("guest image {name} could not be loaded: {reason}")]
    Load {
        /// Image name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Headroom left above the image for the heap.
const MIN_HEAP: u64 = 1 << 20;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// What the checks found: entry point and one past the last loaded byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Entry point.
    pub entry: u64,
    /// End of the highest segment (including .bss).
    pub end: u64,
}

/// Checks an ELF image against `layout` without touching guest memory.
pub fn check_elf(name: &str, b: &[u8], layout: &Layout) -> Result<ImageInfo, ImageError> {
    let not_elf = |reason: &str| ImageError::NotElf {
        name: name.into(),
        reason: reason.into(),
    };
    let bad = |reason: String| ImageError::BadSegment {
        name: name.into(),
        reason,
    };
    if b.len() < 64 {
        return Err(not_elf("file is shorter than an ELF header"));
    }
    if &b[..4] != b"\x7fELF" {
        return Err(not_elf("bad magic"));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(not_elf("not a 64-bit little-endian ELF"));
    }
    if u16_at(b, 16) != 2 {
        return Err(not_elf(
            "not an executable (ET_EXEC): build it static and non-PIE",
        ));
    }
    if u16_at(b, 18) != 62 {
        return Err(not_elf("not an x86_64 program"));
    }
    let entry = u64_at(b, 24);
    let phoff = u64_at(b, 32);
    let phentsize = u64::from(u16_at(b, 54));
    let phnum = u64::from(u16_at(b, 56));
    if phentsize != 56 {
        return Err(not_elf("unexpected program header size"));
    }
    let table_end = phoff.checked_add(phnum * phentsize);
    if phnum == 0 || table_end.is_none_or(|e| e > b.len() as u64) {
        return Err(not_elf("program header table is missing or truncated"));
    }
    check_guest(name, b, phoff, phnum, phentsize)?;
    let limit = layout.heap_end().saturating_sub(MIN_HEAP);
    let mut end = 0u64;
    let mut entry_ok = false;
    for i in 0..phnum {
        let p = (phoff + i * phentsize) as usize;
        if u32_at(b, p) != PT_LOAD {
            continue;
        }
        let offset = u64_at(b, p + 8);
        let paddr = u64_at(b, p + 24);
        let filesz = u64_at(b, p + 32);
        let memsz = u64_at(b, p + 40);
        if filesz > memsz {
            return Err(bad(format!(
                "segment {i} has more file bytes than memory bytes"
            )));
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > b.len() as u64)
        {
            return Err(bad(format!("segment {i} extends past the end of the file")));
        }
        if paddr < IMAGE_BASE {
            return Err(bad(format!(
                "segment {i} at {paddr:#x} is below the image base {IMAGE_BASE:#x} (link with --image-base=0x400000)"
            )));
        }
        let seg_end = paddr
            .checked_add(memsz)
            .filter(|&e| e <= limit)
            .ok_or_else(|| {
                bad(format!(
                    "segment {i} at {paddr:#x} (+{memsz:#x}) does not fit in {} MiB of memory",
                    layout.mem_size() >> 20
                ))
            })?;
        entry_ok |= (paddr..seg_end).contains(&entry);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(not_elf("no loadable segment"));
    }
    if !entry_ok {
        return Err(not_elf("entry point is outside every loadable segment"));
    }
    Ok(ImageInfo { entry, end })
}

/// Refuses what is not an SDK guest: a program that asks for an interpreter, or one without the
/// SDK's ABI note (or with another major version in it). The program header table is in bounds.
fn check_guest(
    name: &str,
    b: &[u8],
    phoff: u64,
    phnum: u64,
    phentsize: u64,
) -> Result<(), ImageError> {
    let not_guest = |reason: String| ImageError::NotAGuest {
        name: name.into(),
        reason,
    };
    let segment = |i: u64| {
        let p = (phoff + i * phentsize) as usize;
        (u32_at(b, p), u64_at(b, p + 8), u64_at(b, p + 32))
    };
    let bytes = |offset: u64, size: u64| {
        let end = offset.checked_add(size)?;
        b.get(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
    };
    let mut version = None;
    for i in 0..phnum {
        let (kind, offset, filesz) = segment(i);
        if kind == PT_INTERP {
            let interp = bytes(offset, filesz)
                .map(|s| String::from_utf8_lossy(s.split(|c| *c == 0).next().unwrap_or(s)))
                .unwrap_or_default();
            return Err(not_guest(format!(
                "it is a dynamically linked program for an operating system (its interpreter is \
                 {interp})"
            )));
        }
        if kind == PT_NOTE
            && let Some(notes) = bytes(offset, filesz)
        {
            version = version.or_else(|| abi_note(notes));
        }
    }
    let Some(version) = version else {
        return Err(not_guest(
            "it has no Rebound ABI note (.note.rebound), which the SDK's runtime (feature `rt`) \
             adds; a static program for Linux would fault at its first system call"
                .into(),
        ));
    };
    if version >> 16 != ABI_MAJOR {
        return Err(not_guest(format!(
            "it was built for guest ABI {}.{}, and this VMM speaks {ABI_MAJOR}.{ABI_MINOR} (major \
             versions must match: rebuild it against this SDK)",
            version >> 16,
            version & 0xffff
        )));
    }
    Ok(())
}

/// The ABI version in the Rebound note among `notes` (the contents of one `PT_NOTE` segment).
fn abi_note(mut notes: &[u8]) -> Option<u32> {
    let pad = |n: u32| (n as usize).checked_next_multiple_of(4);
    while notes.len() >= 12 {
        let (namesz, descsz, kind) = (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8));
        let name_end = 12usize.checked_add(pad(namesz)?)?;
        let desc_end = name_end.checked_add(pad(descsz)?)?;
        let name = notes.get(12..12 + namesz as usize)?;
        let desc = notes.get(name_end..name_end + descsz as usize)?;
        if name == note::NAME && kind == note::TYPE_ABI && desc.len() >= 4 {
            return Some(u32_at(desc, 0));
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// Writes the image, the system structures and the boot info into fresh guest memory.
/// Returns the entry point.
pub fn load(
    mem: &GuestMemory,
    layout: &Layout,
    name: &str,
    image: &[u8],
    args: &str,
    disk_size: u64,
    nics: &[([u8; 6], u16)],
) -> Result<u64, crate::Error> {
    let info = check_elf(name, image, layout)?;
    Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(IMAGE_BASE)),
    )
    .map_err(|e| ImageError::Load {
        name: name.into(),
        reason: e.to_string(),
    })?;
    let boot = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: ABI_VERSION,
        vcpu_count: layout.vcpus(),
        mem_size: layout.mem_size(),
        heap_start: info.end.next_multiple_of(PAGE_SIZE),
        heap_end: layout.heap_end(),
        vcpu_pages: VCPU_PAGES,
        args_addr: BOOT_INFO_ADDR + BOOT_ARGS_OFFSET,
        args_len: args.len() as u64,
        disk_size,
        requests: 0,
        nic_count: nics.len().min(rebound_abi::net::MAX_NICS) as u32,
        reserved: 0,
        nics: Default::default(),
    };
    let mut boot = boot;
    for (slot, &(mac, mtu)) in boot.nics.iter_mut().zip(nics) {
        slot.mac = mac;
        slot.mtu = mtu;
    }
    rebound_arch::system::write_system(mem, layout, &boot, args.as_bytes())?;
    Ok(info.entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(64 << 20, 1).unwrap()
    }

    #[test]
    fn bundled_guest_passes() {
        let i = check_elf("demo", rebound_guests::DEMO, &layout()).unwrap();
        assert!(i.entry >= IMAGE_BASE && i.end > i.entry);
    }

    #[test]
    fn corrupt_images_are_refused_with_a_reason() {
        let good = rebound_guests::TESTGUEST.to_vec();
        let l = layout();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "shorter than an ELF header"),
            (
                b"\x7fELX".iter().copied().chain([0; 60]).collect(),
                "bad magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[4] = 1;
                    b
                },
                "64-bit",
            ),
            (
                {
                    let mut b = good.clone();
                    b[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
                    b
                },
                "truncated",
            ),
            (good[..8192].to_vec(), "past the end of the file"),
            (
                {
                    let mut b = good.clone();
                    b[24..32].copy_from_slice(&0x10u64.to_le_bytes());
                    b
                },
                "entry point",
            ),
        ];
        for (bytes, want) in cases {
            let e = check_elf("t", &bytes, &l).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    /// Offset of the first PT_LOAD program header.
    fn first_load(b: &[u8]) -> usize {
        let phoff = u64_at(b, 32) as usize;
        (0..usize::from(u16_at(b, 56)))
            .map(|i| phoff + i * 56)
            .find(|&p| u32_at(b, p) == PT_LOAD)
            .unwrap()
    }

    #[test]
    fn segments_outside_memory_are_refused() {
        let mut b = rebound_guests::TESTGUEST.to_vec();
        let ph = first_load(&b);
        b[ph + 24..ph + 32].copy_from_slice(&0x1000u64.to_le_bytes());
        let e = check_elf("t", &b, &layout()).unwrap_err().to_string();
        assert!(e.contains("below the image base"), "{e}");
        let mut b = rebound_guests::TESTGUEST.to_vec();
        b[ph + 40..ph + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = check_elf("t", &b, &layout()).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    /// Offset of the program header of the first segment of type `kind`.
    fn header_of(b: &[u8], kind: u32) -> usize {
        let phoff = u64_at(b, 32) as usize;
        (0..usize::from(u16_at(b, 56)))
            .map(|i| phoff + i * 56)
            .find(|&p| u32_at(b, p) == kind)
            .unwrap()
    }

    #[test]
    fn only_sdk_guests_of_this_major_version_are_run() {
        let good = rebound_guests::TESTGUEST.to_vec();
        let note = header_of(&good, PT_NOTE);
        // Without the note (its segment made PT_NULL), as a program built without the SDK.
        let mut b = good.clone();
        b[note..note + 4].copy_from_slice(&0u32.to_le_bytes());
        let e = check_elf("t", &b, &layout()).unwrap_err();
        assert!(matches!(e, ImageError::NotAGuest { .. }), "{e}");
        assert!(e.to_string().contains("no Rebound ABI note"), "{e}");
        // Built for another major version.
        let mut b = good.clone();
        let at = u64_at(&b, note + 8) as usize + 12 + 8;
        assert_eq!(u32_at(&b, at), ABI_VERSION);
        b[at..at + 4].copy_from_slice(&(9u32 << 16).to_le_bytes());
        let e = check_elf("t", &b, &layout()).unwrap_err().to_string();
        assert!(e.contains("built for guest ABI 9.0"), "{e}");
        // A later minor version runs (its new calls get ENOSYS).
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&((ABI_MAJOR << 16) | 99).to_le_bytes());
        check_elf("t", &b, &layout()).unwrap();
        // A dynamically linked program names its interpreter (here: the note's bytes).
        let mut b = good.clone();
        b[note..note + 4].copy_from_slice(&PT_INTERP.to_le_bytes());
        let e = check_elf("t", &b, &layout()).unwrap_err().to_string();
        assert!(e.contains("dynamically linked program"), "{e}");
        // A truncated or lying note is no note, never a panic.
        let mut b = good.clone();
        let n = u64_at(&b, note + 8) as usize;
        b[n..n + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = check_elf("t", &b, &layout()).unwrap_err().to_string();
        assert!(e.contains("no Rebound ABI note"), "{e}");
        assert_eq!(abi_note(&[0; 11]), None);
    }
}

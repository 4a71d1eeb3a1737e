//! Names for guest code addresses, for fault reports a person can act on: the function (from
//! the ELF symbol table, demangled) and, where the guest kept line tables (DWARF
//! `.debug_line`), the file and line. Everything is read from the guest's own ELF, which is
//! hostile input: any malformed table just yields no name.

use std::sync::Arc;

/// A guest image's function symbols, and the image for its line tables.
pub struct Symbols {
    /// (start, size, mangled name), sorted by start.
    funcs: Vec<(u64, u64, String)>,
    elf: Arc<[u8]>,
}

const SHT_SYMTAB: u32 = 2;
const STT_FUNC: u8 = 2;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One section header: (name offset, type, file offset, size, link).
fn section(b: &[u8], i: usize) -> Option<(u32, u32, usize, usize, u32)> {
    let shoff = usize::try_from(u64_at(b, 40)?).ok()?;
    let entsize = usize::from(u16_at(b, 58)?);
    if entsize < 64 {
        return None;
    }
    let at = shoff.checked_add(i.checked_mul(entsize)?)?;
    Some((
        u32_at(b, at)?,
        u32_at(b, at + 4)?,
        usize::try_from(u64_at(b, at + 24)?).ok()?,
        usize::try_from(u64_at(b, at + 32)?).ok()?,
        u32_at(b, at + 40)?,
    ))
}

fn section_count(b: &[u8]) -> usize {
    u16_at(b, 60).map_or(0, usize::from)
}

fn bytes(b: &[u8], offset: usize, size: usize) -> Option<&[u8]> {
    b.get(offset..offset.checked_add(size)?)
}

/// The NUL-terminated string at `at` in `table`.
fn string(table: &[u8], at: usize) -> Option<&str> {
    let s = table.get(at..)?;
    let end = s.iter().position(|c| *c == 0)?;
    std::str::from_utf8(&s[..end]).ok()
}

/// The contents of the section named `name`.
fn section_named<'a>(b: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let shstrndx = usize::from(u16_at(b, 62)?);
    let (_, _, off, size, _) = section(b, shstrndx)?;
    let names = bytes(b, off, size)?;
    (0..section_count(b)).find_map(|i| {
        let (n, _, off, size, _) = section(b, i)?;
        (string(names, n as usize)? == name)
            .then(|| bytes(b, off, size))
            .flatten()
    })
}

impl Symbols {
    /// The function symbols of `elf`; None if it has no symbol table (a stripped guest).
    pub fn parse(elf: &[u8]) -> Option<Self> {
        let mut funcs = Vec::new();
        for i in 0..section_count(elf) {
            let Some((_, kind, off, size, link)) = section(elf, i) else {
                continue;
            };
            if kind != SHT_SYMTAB {
                continue;
            }
            let (Some(table), Some((_, _, soff, ssize, _))) =
                (bytes(elf, off, size), section(elf, link as usize))
            else {
                continue;
            };
            let Some(names) = bytes(elf, soff, ssize) else {
                continue;
            };
            for sym in table.chunks_exact(24) {
                let (Some(name), Some(value), Some(len)) =
                    (u32_at(sym, 0), u64_at(sym, 8), u64_at(sym, 16))
                else {
                    continue;
                };
                if sym[4] & 0xf != STT_FUNC || value == 0 {
                    continue;
                }
                if let Some(n) = string(names, name as usize) {
                    funcs.push((value, len, n.to_string()));
                }
            }
        }
        if funcs.is_empty() {
            return None;
        }
        funcs.sort_unstable_by_key(|f| f.0);
        Some(Self {
            funcs,
            elf: elf.into(),
        })
    }

    /// Every function: (start, size).
    pub(crate) fn functions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.funcs.iter().map(|f| (f.0, f.1))
    }

    /// The function containing `addr`, demangled, with the offset into it.
    pub fn function(&self, addr: u64) -> Option<String> {
        let i = self.funcs.partition_point(|f| f.0 <= addr).checked_sub(1)?;
        let (start, len, name) = &self.funcs[i];
        // A symbol without a size covers up to the next one.
        let end = if *len > 0 {
            start.saturating_add(*len)
        } else {
            self.funcs.get(i + 1).map_or(u64::MAX, |f| f.0)
        };
        (addr < end).then(|| format!("{:#}+{:#x}", rustc_demangle::demangle(name), addr - start))
    }

    /// `file:line` of `addr`, if the image has line tables for it.
    pub fn line(&self, addr: u64) -> Option<String> {
        let endian = gimli::RunTimeEndian::Little;
        let load = |id: gimli::SectionId| -> Result<_, gimli::Error> {
            Ok(gimli::EndianSlice::new(
                section_named(&self.elf, id.name()).unwrap_or(&[]),
                endian,
            ))
        };
        let dwarf = gimli::Dwarf::load(load).ok()?;
        let ctx = addr2line::Context::from_dwarf(dwarf).ok()?;
        let loc = ctx.find_location(addr).ok()??;
        Some(format!("{}:{}", loc.file?, loc.line?))
    }

    /// `function+offset (file:line)`, as much of it as is known.
    pub fn describe(&self, addr: u64) -> Option<String> {
        match (self.function(addr), self.line(addr)) {
            (Some(f), Some(l)) => Some(format!("{f} ({l})")),
            (Some(f), None) => Some(f),
            (None, Some(l)) => Some(l),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundled_guests_function_is_named_demangled() {
        let s = Symbols::parse(rebound_guests::TESTGUEST).expect("symbols");
        let (start, len, _) = s
            .funcs
            .iter()
            .find(|f| f.2.contains("rebound_guest2rt5start"))
            .unwrap()
            .clone();
        assert!(len > 1);
        let f = s.function(start + 1).unwrap();
        assert_eq!(f, "rebound_guest::rt::start+0x1");
        // Its line tables (release guests keep them) name the SDK's runtime.
        let l = s.line(start + 1).unwrap();
        assert!(l.contains("rt.rs:"), "{l}");
        assert_eq!(s.function(1), None);
    }

    #[test]
    fn damaged_tables_give_no_name_and_never_panic() {
        let good = rebound_guests::TESTGUEST.to_vec();
        for at in [40, 58, 60, 62] {
            for v in [0u8, 0xff] {
                let mut b = good.clone();
                b[at] = v;
                b[at + 1] = v;
                if let Some(s) = Symbols::parse(&b) {
                    let _ = s.describe(u64_at(&b, 24).unwrap());
                }
            }
        }
        assert!(Symbols::parse(&good[..100]).is_none());
    }
}

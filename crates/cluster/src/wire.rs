//! The replication stream: TCP, the primary sending and the standby answering, one message per
//! frame. A frame is `[magic "RBRP"][length: u64 LE][CRC32C of the payload: u32 LE][payload]`,
//! the payload a postcard-encoded [`Msg`]. A frame whose magic or checksum is wrong, or whose
//! length passes what the receiver allows at that point, ends the connection: nothing of a torn
//! or damaged stream is used.

use std::io::{Read, Write};

use rebound_snapshot::component::ComponentStates;
use rebound_vmm::persist::VmDescriptor;
use serde::{Deserialize, Serialize};

use crate::Error;

const MAGIC: [u8; 4] = *b"RBRP";
const HEADER: usize = 16;
/// Protocol version (the Hello carries it; a standby refuses another).
pub const VERSION: u32 = 3;
/// Largest frame before the Hello said how large the VM is.
pub const HELLO_MAX: u64 = 64 << 10;
/// What an epoch frame may hold besides memory (state, output).
pub const EPOCH_OVERHEAD_MAX: u64 = 128 << 20;

/// One checkpoint, as replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// Its epoch number.
    pub epoch: u64,
    /// Its id.
    pub id: u64,
    /// The checkpoint (epoch, id) it follows on this connection; None for the first.
    pub follows: Option<(u64, u64)>,
    /// `pages` is every page that may hold data (absent ones are zero), not a diff.
    pub full: bool,
    /// The VM's description.
    pub vm: VmDescriptor,
    /// Every component's state.
    pub components: ComponentStates,
    /// Page numbers, ascending; their bytes are `data`, 4096 each, in the same order.
    pub pages: Vec<u64>,
    /// `data` is an LZ4 block of the pages' bytes (sent so when it is at most 7/8 of them).
    pub compressed: bool,
    /// The pages' bytes.
    pub data: Vec<u8>,
    /// Where the released output goes in the console stream, and the bytes.
    pub output_offset: u64,
    /// The output this checkpoint releases.
    pub output: Vec<u8>,
}

/// A message of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Primary: who it is (first message of a connection).
    Hello {
        /// [`VERSION`].
        version: u32,
        /// The VM's name.
        vm: String,
        /// Guest memory in bytes.
        mem_size: u64,
        /// A hot standby is asked for: the VM's memory kept applied in place, ready to resume
        /// (else cold: the checkpoint chain).
        hot: bool,
    },
    /// Primary: a checkpoint.
    Epoch(Box<Epoch>),
    /// Standby: the checkpoint is stored durably.
    Ack {
        /// Its epoch.
        epoch: u64,
        /// Its id.
        id: u64,
    },
    /// Standby: refused (the connection ends).
    Refuse {
        /// Why.
        reason: String,
    },
    /// Primary: the VM's checkpoints stop here on purpose (it ended, or its protection
    /// stopped): the standby must not take it over.
    Bye,
    /// Primary: a full copy starts, made while the VM runs (first message after the Hello).
    /// What the standby kept may from now on be older than what the primary releases: it
    /// makes it unusable, then answers [`Msg::Ready`].
    Resync,
    /// Standby: what it kept is unusable; the copy may start.
    Ready,
    /// Primary: pages of the full copy, read from the running VM (so not consistent until
    /// the full epoch that ends the copy carries every page written since it started).
    Base(Box<Base>),
}

/// Part of a full copy made while the VM runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// Page numbers, ascending and above every page of earlier parts.
    pub pages: Vec<u64>,
    /// `data` is an LZ4 block.
    pub compressed: bool,
    /// The pages' bytes, 4096 each, in order.
    pub data: Vec<u8>,
}

/// Compresses the pages' bytes `raw` if that pays (the result is at most 7/8 of them);
/// returns the bytes to send and whether they are compressed.
pub fn pack(raw: Vec<u8>) -> (Vec<u8>, bool) {
    let packed = lz4_flex::block::compress(&raw);
    if packed.len() <= raw.len() / 8 * 7 {
        (packed, true)
    } else {
        (raw, false)
    }
}

/// The pages' bytes of `e`: `e.data`, decompressed if it is. The result must be exactly one
/// page per listed page (checked: a hostile stream cannot make it larger).
pub fn unpack(e: &Epoch) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    unpack_pages(e.pages.len(), e.compressed, &e.data)
}

/// The bytes of `pages` pages sent as `data` (compressed or not), checked to be exactly that
/// many pages.
pub fn unpack_pages(
    pages: usize,
    compressed: bool,
    data: &[u8],
) -> Result<std::borrow::Cow<'_, [u8]>, String> {
    let want = pages * rebound_snapshot::PAGE_SIZE as usize;
    if !compressed {
        if data.len() != want {
            return Err(format!("{pages} pages with {} bytes", data.len()));
        }
        return Ok(std::borrow::Cow::Borrowed(data));
    }
    // An LZ4 block expands at most ~255 times: a claim beyond that is refused before
    // anything is allocated for it.
    if want > data.len().saturating_mul(255).saturating_add(4096) {
        return Err(format!(
            "{} bytes cannot hold {pages} compressed pages",
            data.len()
        ));
    }
    let mut out = vec![0u8; want];
    match lz4_flex::block::decompress_into(data, &mut out) {
        Ok(n) if n == want => Ok(std::borrow::Cow::Owned(out)),
        Ok(n) => Err(format!("{n} bytes of pages for {pages} pages")),
        Err(err) => Err(format!("the pages do not decompress: {err}")),
    }
}

/// Writes `msg` as one frame.
pub fn send(w: &mut impl Write, msg: &Msg) -> Result<(), Error> {
    let payload =
        postcard::to_stdvec(msg).map_err(|e| Error::Protocol(format!("cannot encode: {e}")))?;
    let mut head = [0u8; HEADER];
    head[..4].copy_from_slice(&MAGIC);
    head[4..12].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    head[12..16].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(&payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame of at most `max` payload bytes and decodes it.
pub fn recv(r: &mut impl Read, max: u64) -> Result<Msg, Error> {
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head)?;
    if head[..4] != MAGIC {
        return Err(Error::Protocol(
            "bad magic: not a replication stream".into(),
        ));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[4..12]);
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(Error::Protocol(format!(
            "a {len}-byte frame where at most {max} are allowed"
        )));
    }
    let crc = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    // Memory grows with the bytes that actually arrive, not with what the header claims.
    let mut payload = Vec::with_capacity(len.min(1 << 20) as usize);
    r.take(len).read_to_end(&mut payload)?;
    if payload.len() as u64 != len {
        return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if crc32c::crc32c(&payload) != crc {
        return Err(Error::Protocol("a frame's checksum does not match".into()));
    }
    postcard::from_bytes(&payload).map_err(|e| Error::Protocol(format!("cannot decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_refused() {
        let msg = Msg::Ack { epoch: 7, id: 9 };
        let mut buf = Vec::new();
        send(&mut buf, &msg).unwrap();
        assert_eq!(recv(&mut buf.as_slice(), 1024).unwrap(), msg);
        // Every single-bit flip of the frame is refused (or, in the length, caught as a short
        // or oversized read), never decoded as something else.
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(recv(&mut b.as_slice(), 1024).is_err(), "bit {i}");
        }
        // Torn: any prefix.
        for n in 0..buf.len() {
            assert!(recv(&mut &buf[..n], 1024).is_err());
        }
        assert!(recv(&mut buf.as_slice(), 2).is_err(), "over the limit");
    }

    #[test]
    fn pages_are_compressed_only_when_it_pays_and_never_unpack_larger() {
        let (zeros, c) = pack(vec![0u8; 8192]);
        assert!(c && zeros.len() < 1024);
        let mut x = 1u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let (sent, c) = pack(noise.clone());
        assert!(!c && sent == noise);
        let mut e = Epoch {
            epoch: 1,
            id: 1,
            follows: None,
            full: true,
            vm: rebound_vmm::persist::VmDescriptor {
                mem_size: 1 << 20,
                vcpus: 1,
                image: String::new(),
                boot_args: String::new(),
                disk: None,
                abi_version: 0,
            },
            components: Default::default(),
            pages: vec![0, 1],
            compressed: true,
            data: zeros,
            output_offset: 0,
            output: Vec::new(),
        };
        assert_eq!(unpack(&e).unwrap().len(), 8192);
        // The same block claimed for one page: refused, not grown.
        e.pages = vec![0];
        assert!(unpack(&e).is_err());
        e.data = vec![0xff; 16];
        assert!(unpack(&e).is_err());
    }
}

//! The aggregated heartbeat: one UDP datagram per interval from a host agent to each peer,
//! carrying the state of every VM on the host. Monitoring traffic grows with the number of
//! hosts, not of VMs (a VM adds a few bytes to the datagram, never a message).
//!
//! A datagram is `[magic "RBHB"][CRC32C of the payload: u32 LE][payload]`, the payload a
//! postcard-encoded [`Beat`]; anything else is dropped.

use serde::{Deserialize, Serialize};

const MAGIC: [u8; 4] = *b"RBHB";
/// Largest datagram sent or accepted (a UDP datagram on loopback or a LAN without IP
/// fragmentation problems: 64 KiB is the protocol's own bound).
pub const MAX_DATAGRAM: usize = 65_000;

/// A VM's state as its host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Running and making progress (or waiting for work).
    Running,
    /// Its guest stopped making progress: a per-VM failure.
    Stalled,
    /// Its VMM process died: a per-VM failure.
    Dead,
    /// Its VMM process died and its host recovers it from its state directory: not for its
    /// standby to take over.
    Restarting,
}

/// One VM in a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmBeat {
    /// The VM's name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// The host that keeps its standby, if any.
    pub standby: Option<String>,
    /// Its standby is hot.
    pub hot: bool,
    /// The newest checkpoint its standby (and every other sink) acknowledged.
    pub acked_epoch: u64,
}

/// A standby a host keeps for a peer's VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The VM.
    pub vm: String,
    /// The newest epoch stored.
    pub epoch: u64,
    /// Bytes of pages stored in all.
    pub bytes: u64,
}

/// One host's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// The sending host.
    pub host: String,
    /// Random per agent start: a restarted agent is a new incarnation.
    pub incarnation: u64,
    /// Counts up per beat.
    pub seq: u64,
    /// Bytes of memory it can still give hot standbys.
    pub hot_free: u64,
    /// Its VMs.
    pub vms: Vec<VmBeat>,
    /// The standbys it keeps (what its peers' VMs' replication reached).
    pub kept: Vec<Kept>,
}

/// Encodes a beat into a datagram (None: too many VMs for one datagram).
pub fn encode(b: &Beat) -> Option<Vec<u8>> {
    let payload = postcard::to_allocvec(b).ok()?;
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    (out.len() <= MAX_DATAGRAM).then_some(out)
}

/// Decodes a datagram (None: not a valid beat).
pub fn decode(d: &[u8]) -> Option<Beat> {
    if d.len() < 8 || d[..4] != MAGIC {
        return None;
    }
    let payload = &d[8..];
    if crc32c::crc32c(payload).to_le_bytes() != d[4..8] {
        return None;
    }
    postcard::from_bytes(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(n: usize) -> Beat {
        Beat {
            host: "h1".into(),
            incarnation: 7,
            seq: 3,
            hot_free: 1 << 30,
            vms: (0..n)
                .map(|i| VmBeat {
                    name: format!("vm{i}"),
                    state: VmState::Running,
                    standby: Some("h2".into()),
                    hot: i % 2 == 0,
                    acked_epoch: 1000 + i as u64,
                })
                .collect(),
            kept: Vec::new(),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let b = beat(64);
        let d = encode(&b).unwrap();
        assert_eq!(decode(&d), Some(b));
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad), None, "flipped byte {i}");
        }
        for n in 0..d.len() {
            assert_eq!(decode(&d[..n]), None, "cut at {n}");
        }
    }

    #[test]
    fn a_thousand_vms_fit_one_datagram() {
        assert!(encode(&beat(1000)).is_some());
    }
}

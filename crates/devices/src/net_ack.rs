//! The last acknowledgement a guest's TCP connection sent out, kept so that a VMM taking the VM
//! over can send it again. A duplicate ACK is always harmless in TCP, and it makes the peer (or a
//! user-mode stack such as passt) retransmit at once what it sent while no VMM was there,
//! instead of after its retransmission timeout.

use std::collections::HashMap;

/// A connection: IPv4 source and destination addresses and ports.
type Flow = ([u8; 4], [u8; 4], u16, u16);

/// Most connections remembered.
pub const MAX_FLOWS: usize = 4096;

/// The last pure ACK of each connection, by NIC.
#[derive(Default)]
pub struct LastAcks {
    flows: HashMap<(usize, Flow), Vec<u8>>,
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        acc += u32::from(w);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// `frame` without its TCP payload and with only the ACK flag: a pure ACK with the same
/// sequence and acknowledgement numbers and window. None if it is not an IPv4 TCP segment with
/// ACK set, or is a reset.
pub fn pure_ack(frame: &[u8]) -> Option<(Flow, Vec<u8>)> {
    if frame.len() < 14 + 20 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    // Fragments cannot be told apart: only whole segments.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let tcp = &ip[ihl..];
    let doff = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    if doff < 20 || tcp.len() < doff || flags & 0x10 == 0 || flags & 0x04 != 0 {
        return None;
    }
    let src: [u8; 4] = ip[12..16].try_into().ok()?;
    let dst: [u8; 4] = ip[16..20].try_into().ok()?;
    let flow = (
        src,
        dst,
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    let ip_total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let payload = ip_total.saturating_sub(ihl + doff).min(tcp.len() - doff);
    let mut out = frame[..14 + ihl + doff].to_vec();
    let total = (ihl + doff) as u16;
    {
        let ip = &mut out[14..14 + ihl];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = fold(sum16(ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    // SYN, FIN and PSH cleared: only the acknowledgement is repeated, from where the segment
    // left the sequence (after its payload and a FIN), so the peer takes it as current.
    let seg = &mut out[14 + ihl..];
    let advance = payload as u32 + u32::from(flags & 0x01);
    let seq = u32::from_be_bytes([seg[4], seg[5], seg[6], seg[7]]).wrapping_add(advance);
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    seg[13] = 0x10;
    seg[16..18].copy_from_slice(&[0, 0]);
    let mut acc = sum16(&src, 0);
    acc = sum16(&dst, acc);
    acc += 6 + u32::from(doff as u16);
    acc = sum16(seg, acc);
    let c = fold(acc);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    Some((flow, out))
}

impl LastAcks {
    /// Remembers `frame` (sent out on NIC `nic`) if it is a TCP segment; forgets a connection
    /// that was reset.
    pub fn note(&mut self, nic: usize, frame: &[u8]) {
        match pure_ack(frame) {
            Some((flow, ack)) => {
                if self.flows.len() < MAX_FLOWS || self.flows.contains_key(&(nic, flow)) {
                    self.flows.insert((nic, flow), ack);
                }
            }
            None => {
                // A reset ends the connection: nothing to acknowledge again.
                if frame.len() >= 54 && frame[12..14] == [0x08, 0x00] && frame[23] == 6 {
                    let ihl = usize::from(frame[14] & 0x0f) * 4;
                    if let Some(tcp) = frame.get(14 + ihl..14 + ihl + 20)
                        && tcp[13] & 0x04 != 0
                    {
                        self.flows.retain(|(n, f), _| {
                            !(*n == nic
                                && f.2 == u16::from_be_bytes([tcp[0], tcp[1]])
                                && f.3 == u16::from_be_bytes([tcp[2], tcp[3]]))
                        });
                    }
                }
            }
        }
    }

    /// The remembered ACKs of NIC `nic`'s connections.
    pub fn for_nic(&self, nic: usize) -> Vec<Vec<u8>> {
        self.flows
            .iter()
            .filter(|((n, _), _)| *n == nic)
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// Every remembered ACK, as `[nic: u32][len: u32][frame]` records.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ((nic, _), f) in &self.flows {
            out.extend_from_slice(&(*nic as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    /// The frames in records written by [`encode`](Self::encode) (a torn tail is ignored).
    pub fn decode(bytes: &[u8]) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 8 <= bytes.len() {
            let nic = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                as usize;
            let len =
                u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]])
                    as usize;
            let end = at + 8 + len;
            if end > bytes.len() || len > 256 {
                break;
            }
            out.push((nic, bytes[at + 8..end].to_vec()));
            at = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP segment with `flags` and `payload`, checksums right.
    fn segment(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let c = fold(sum16(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&6379u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[8..12].copy_from_slice(&5000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&8192u16.to_be_bytes());
        tcp.extend_from_slice(payload);
        let mut acc = sum16(&ip[12..16], 0);
        acc = sum16(&ip[16..20], acc);
        acc += 6 + tcp.len() as u32;
        let c = fold(sum16(&tcp, acc));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        f
    }

    fn checksums_hold(f: &[u8]) -> bool {
        let ip = &f[14..34];
        let tcp = &f[34..];
        let mut acc = sum16(&ip[12..16], 0);
        acc = sum16(&ip[16..20], acc);
        acc += 6 + tcp.len() as u32;
        fold(sum16(ip, 0)) == 0 && fold(sum16(tcp, acc)) == 0
    }

    #[test]
    fn a_data_segment_becomes_a_pure_ack() {
        let seg = segment(0x18, b"+OK\r\n");
        assert!(checksums_hold(&seg));
        let (flow, ack) = pure_ack(&seg).unwrap();
        assert_eq!(flow.2, 6379);
        assert_eq!(ack.len(), 54);
        assert_eq!(ack[47], 0x10, "only ACK");
        assert_eq!(&ack[42..46], &5000u32.to_be_bytes(), "same acknowledgement");
        assert_eq!(
            &ack[38..42],
            &1005u32.to_be_bytes(),
            "sequence after the payload"
        );
        assert!(checksums_hold(&ack));
        // A FIN's ACK moves the sequence past it.
        let (_, ack) = pure_ack(&segment(0x11, b"")).unwrap();
        assert_eq!(&ack[38..42], &1001u32.to_be_bytes());
        assert!(checksums_hold(&ack));
        assert!(pure_ack(&segment(0x04, b"")).is_none(), "not a reset");
        assert!(pure_ack(&segment(0x02, b"")).is_none(), "not a bare SYN");
        assert!(pure_ack(&[0u8; 20]).is_none());
    }

    #[test]
    fn flows_are_remembered_encoded_and_forgotten_on_reset() {
        let mut l = LastAcks::default();
        l.note(0, &segment(0x18, b"a"));
        l.note(0, &segment(0x10, b""));
        assert_eq!(l.flows.len(), 1);
        let back = LastAcks::decode(&l.encode());
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1.len(), 54);
        let mut torn = l.encode();
        torn.truncate(20);
        assert!(LastAcks::decode(&torn).is_empty());
        l.note(0, &segment(0x14, b""));
        assert!(l.flows.is_empty(), "a reset ends it");
    }
}

//! NIC failover across host paths: one virtual NIC over several TAP devices, each attached to
//! its own host path (a bridge on its own uplink). Every path is watched, by the carrier of
//! the link it depends on and, given a probe address, by ARP probes every few milliseconds
//! from a MAC of its own (so probing a standby path never moves the guest's MAC to it). When
//! the active path fails and another is healthy, frames go through the other one at once and a
//! gratuitous ARP from the guest's MAC makes switches and peers relearn where it is.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use rebound_devices::net::Backend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::PathConfig;
use crate::tap::{Tap, carrier};

/// How often each path with a probe address is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Probes a path may leave unanswered before it counts as failed.
pub const PROBE_MISSES: u32 = 3;

struct Path {
    tap: Tap,
    config: PathConfig,
    /// The MAC its probes come from (never the guest's).
    probe_mac: [u8; 6],
    last_reply: Instant,
    last_probe: Option<Instant>,
    healthy: bool,
}

impl Path {
    fn monitored_link(&self) -> &str {
        self.config
            .monitor_link
            .as_deref()
            .unwrap_or(&self.config.host_dev_name)
    }
}

/// A NIC's backend over several paths.
pub struct Paths {
    paths: Vec<Path>,
    active: usize,
    epoll: Epoll,
    guest_mac: [u8; 6],
    /// The guest's IPv4 address, learned from the frames it sends (for gratuitous ARP).
    guest_ip: Option<Ipv4Addr>,
    failovers: u64,
    /// The path a frame was last received from (by index), to serve paths fairly.
    next_rx: usize,
}

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;

fn arp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    op: u16,
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip.octets());
    f.resize(60, 0);
    f
}

impl Paths {
    /// Opens every path's TAP; the first is active.
    pub fn open(configs: &[PathConfig], guest_mac: [u8; 6]) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let now = Instant::now();
        let mut paths = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let tap = Tap::open(&c.host_dev_name)?;
            epoll.ctl(
                ControlOperation::Add,
                tap.fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
            // Locally administered, derived from the guest's MAC and the path.
            let probe_mac = [
                0x06,
                guest_mac[1] ^ 0x5a,
                guest_mac[2],
                guest_mac[3],
                guest_mac[4],
                guest_mac[5].wrapping_add(0x40 + i as u8),
            ];
            paths.push(Path {
                tap,
                config: c.clone(),
                probe_mac,
                last_reply: now,
                last_probe: None,
                healthy: true,
            });
        }
        if paths.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no paths"));
        }
        Ok(Self {
            paths,
            active: 0,
            epoll,
            guest_mac,
            guest_ip: None,
            failovers: 0,
            next_rx: 0,
        })
    }

    /// The active path's TAP.
    pub fn active(&self) -> &str {
        self.paths[self.active].tap.name()
    }

    /// Times the NIC moved to another path.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Learns the guest's IPv4 address from a frame it sends (ARP sender, or IPv4 source).
    fn learn(&mut self, frame: &[u8]) {
        if frame.len() < 34 || frame[6..12] != self.guest_mac {
            return;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let ip = match ethertype {
            ETH_ARP if frame.len() >= 42 => [frame[28], frame[29], frame[30], frame[31]],
            ETH_IPV4 => [frame[26], frame[27], frame[28], frame[29]],
            _ => return,
        };
        let ip = Ipv4Addr::from(ip);
        if !ip.is_unspecified() {
            self.guest_ip = Some(ip);
        }
    }

    /// Whether `frame` answers path `i`'s probe (and is the backend's, not the guest's).
    fn is_probe_reply(&self, i: usize, frame: &[u8]) -> bool {
        frame.len() >= 42
            && frame[0..6] == self.paths[i].probe_mac
            && u16::from_be_bytes([frame[12], frame[13]]) == ETH_ARP
    }

    fn probe(&mut self, now: Instant) {
        for p in &mut self.paths {
            let Some(target) = p.config.probe_ip else {
                continue;
            };
            if p.last_probe
                .is_some_and(|t| now.duration_since(t) < PROBE_INTERVAL)
            {
                continue;
            }
            p.last_probe = Some(now);
            // An ARP probe (sender 0.0.0.0): it asks without claiming any address.
            let f = arp_frame(
                [0xff; 6],
                p.probe_mac,
                1,
                Ipv4Addr::UNSPECIFIED,
                [0; 6],
                target,
            );
            let _ = p.tap.send(&f);
        }
    }

    fn judge(&mut self, now: Instant) {
        let dead_after = PROBE_INTERVAL * (PROBE_MISSES + 1);
        for p in &mut self.paths {
            let link = carrier(p.monitored_link());
            let answering =
                p.config.probe_ip.is_none() || now.duration_since(p.last_reply) <= dead_after;
            let healthy = link && answering;
            if healthy != p.healthy {
                tracing::warn!(
                    path = %p.config.host_dev_name,
                    healthy,
                    link,
                    answering,
                    "network path changed state"
                );
            }
            p.healthy = healthy;
        }
        if !self.paths[self.active].healthy
            && let Some(next) = (1..self.paths.len())
                .map(|k| (self.active + k) % self.paths.len())
                .find(|&i| self.paths[i].healthy)
        {
            let from = self.active;
            self.active = next;
            self.failovers += 1;
            tracing::warn!(
                from = %self.paths[from].config.host_dev_name,
                to = %self.paths[next].config.host_dev_name,
                "network failover"
            );
            self.announce();
        }
    }

    /// Gratuitous ARP from the guest's MAC on the active path: peers and switches relearn.
    fn announce(&mut self) {
        let ip = self.guest_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mac = self.guest_mac;
        let request = arp_frame([0xff; 6], mac, 1, ip, [0; 6], ip);
        let reply = arp_frame([0xff; 6], mac, 2, ip, mac, ip);
        let tap = &mut self.paths[self.active].tap;
        let _ = tap.send(&request);
        let _ = tap.send(&reply);
    }
}

impl Backend for Paths {
    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.learn(frame);
        self.paths[self.active].tap.send(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let now = Instant::now();
        let n = self.paths.len();
        for k in 0..n {
            let i = (self.next_rx + k) % n;
            loop {
                match self.paths[i].tap.recv(buf) {
                    Ok(len) => {
                        if self.is_probe_reply(i, &buf[..len]) {
                            self.paths[i].last_reply = now;
                            continue;
                        }
                        if i != self.active {
                            // A standby path's traffic (flooding, broadcasts) is not the guest's.
                            continue;
                        }
                        self.next_rx = (i + 1) % n;
                        return Ok(len);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        // Drain the epoll readiness so the device loop does not spin.
        let mut events = [EpollEvent::default(); 8];
        let _ = self.epoll.wait(0, &mut events);
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn buffered(&self) -> bool {
        false
    }

    fn service(&mut self) -> io::Result<()> {
        let now = Instant::now();
        self.probe(now);
        self.judge(now);
        Ok(())
    }

    fn link_up(&self) -> bool {
        self.paths.iter().any(|p| p.healthy)
    }

    fn failovers(&self) -> u64 {
        self.failovers
    }

    fn describe(&self) -> String {
        let paths: Vec<String> = self
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "{}{}{}",
                    p.config.host_dev_name,
                    if i == self.active { " (active)" } else { "" },
                    if p.healthy { "" } else { " (failed)" }
                )
            })
            .collect();
        format!("paths {}; {} failovers", paths.join(", "), self.failovers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_frames_are_well_formed() {
        let f = arp_frame(
            [0xff; 6],
            [2, 0, 0, 0, 0, 1],
            1,
            Ipv4Addr::new(10, 0, 0, 2),
            [0; 6],
            Ipv4Addr::new(10, 0, 0, 1),
        );
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[38..42], &[10, 0, 0, 1]);
    }
}

//! A host's cluster directory, shared by its agent and its VMMs (on tmpfs: hot standbys keep
//! guest memory there):
//!
//! ```text
//! ROOT/host.json             the agent's settings (its name, peers, heartbeat, fencing), for VMMs
//! ROOT/agent.sock            the agent's status socket (`rebound cluster status`)
//! ROOT/vms/NAME/member.json  a VM running here: its VMM's pid, API socket, standby, failover
//! ROOT/vms/NAME/status       its VMM's status record, rewritten every heartbeat interval
//! ROOT/standby/NAME.hot      a hot standby kept here (a state directory)
//! ROOT/standby/NAME.cold     a cold standby kept here (a snapshot directory)
//! ROOT/out/NAME.N            console output of a VM this agent took over or restarted (Nth)
//! ```
//!
//! The agent reads every VM's status record each interval: a VM's liveness reaches it without
//! a message. A VMM that dies stops rewriting it, and its pid is gone.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a VM wants to survive its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failover {
    /// The standby keeps the VM's memory applied in place; failover resumes it.
    Hot,
    /// The standby keeps the checkpoint chain; failover builds the VM from it.
    Cold,
    /// Hot if the standby host has the memory for it, else cold if that meets the VM's
    /// maximum failover time.
    #[default]
    Auto,
}

impl Failover {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hot => "hot",
            Self::Cold => "cold",
            Self::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Failover {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hot" => Ok(Self::Hot),
            "cold" => Ok(Self::Cold),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("{s:?}: choose hot, cold or auto")),
        }
    }
}

/// The agent's settings, as VMMs on its host read them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    /// This host's name.
    pub name: String,
    /// Where its agent listens (heartbeats over UDP, replication over TCP).
    pub listen: String,
    /// Peer hosts by name: their agents' addresses.
    pub peers: BTreeMap<String, String>,
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// Where VMMs take their VM's ownership lock (shared by every agent that may own the
    /// VMs); None when ownership is kept in etcd.
    pub lock_dir: Option<PathBuf>,
}

/// A VM running on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its name (unique in the cluster).
    pub name: String,
    /// Its VMM's pid.
    pub pid: u32,
    /// Its VMM's API socket.
    pub api_sock: Option<PathBuf>,
    /// The host it wants its standby on.
    pub standby: Option<String>,
    /// How it wants to survive its host.
    pub failover: Failover,
    /// The longest failover it accepts (for `auto`: cold only if its estimate is within it).
    pub max_failover_ms: Option<u64>,
    /// Its memory in bytes (what a hot standby needs).
    pub mem_size: u64,
    /// Its state directory, if it keeps one: a VM whose VMM dies while its host is fine is
    /// recovered from it on this host (a few times a minute at most) rather than failed over.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// What a VMM says about its VM every interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Counts up every time the VMM writes the record (the VMM's own liveness).
    pub seq: u64,
    /// The guest's heartbeat (sum of its vCPUs' words).
    pub beat: u64,
    /// Every vCPU waits for work.
    pub waiting: bool,
    /// The VM ended (on purpose: no failover).
    pub ended: bool,
    /// The newest checkpoint every sink (the standby included) acknowledged.
    pub acked_epoch: u64,
    /// Output held for acknowledgement, in bytes.
    pub held_bytes: u64,
}

const STATUS_MAGIC: [u8; 8] = *b"RBNDVMST";
const STATUS_SIZE: usize = 56;

impl Status {
    fn encode(&self) -> [u8; STATUS_SIZE] {
        let mut b = [0u8; STATUS_SIZE];
        b[0..8].copy_from_slice(&STATUS_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.beat.to_le_bytes());
        b[24] = u8::from(self.waiting) | (u8::from(self.ended) << 1);
        b[32..40].copy_from_slice(&self.acked_epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.held_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != STATUS_SIZE || b[0..8] != STATUS_MAGIC {
            return None;
        }
        if crc32c::crc32c(&b[..48]).to_le_bytes() != b[48..52] {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        Some(Self {
            seq: word(8),
            beat: word(16),
            waiting: b[24] & 1 != 0,
            ended: b[24] & 2 != 0,
            acked_epoch: word(32),
            held_bytes: word(40),
        })
    }
}

/// A host's cluster directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoot {
    path: PathBuf,
}

impl HostRoot {
    /// The directory at `path` (created if needed).
    pub fn new(path: &Path) -> io::Result<Self> {
        for sub in ["vms", "standby", "out"] {
            std::fs::create_dir_all(path.join(sub))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The agent's settings file.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("host.json")
    }

    /// The agent's status socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join("agent.sock")
    }

    /// Writes the agent's settings (atomically).
    pub fn write_config(&self, c: &HostConfig) -> io::Result<()> {
        write_json(&self.config_path(), c)
    }

    /// Reads the agent's settings.
    pub fn config(&self) -> io::Result<HostConfig> {
        read_json(&self.config_path())
    }

    /// VM `name`'s directory.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.path.join("vms").join(name)
    }

    /// Where a hot (`hot`) or cold standby of `name` is kept.
    pub fn standby_dir(&self, name: &str, hot: bool) -> PathBuf {
        self.path
            .join("standby")
            .join(format!("{name}.{}", if hot { "hot" } else { "cold" }))
    }

    /// A new file for the console output of a VM taken over here.
    pub fn takeover_output(&self, name: &str) -> PathBuf {
        let out = self.path.join("out");
        (1..)
            .map(|n| out.join(format!("{name}.{n}")))
            .find(|p| !p.exists())
            .unwrap_or_else(|| out.join(name))
    }

    /// Registers a VM running here.
    pub fn join(&self, m: &Member) -> io::Result<StatusWriter> {
        let dir = self.vm_dir(&m.name);
        std::fs::create_dir_all(&dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("status"))?;
        let w = StatusWriter {
            file,
            status: Status::default(),
        };
        write_json(&dir.join("member.json"), m)?;
        Ok(w)
    }

    /// The VMs registered here, with their last status (None: unreadable or not written yet).
    pub fn members(&self) -> Vec<(Member, Option<Status>)> {
        let Ok(dir) = std::fs::read_dir(self.path.join("vms")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in dir.flatten() {
            let p = e.path();
            let Ok(m) = read_json::<Member>(&p.join("member.json")) else {
                continue;
            };
            let status = std::fs::read(p.join("status"))
                .ok()
                .and_then(|b| Status::decode(&b));
            out.push((m, status));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }

    /// Forgets a VM (it ended, or moved away).
    pub fn leave(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.vm_dir(name));
    }
}

/// Rewrites a VM's status record.
pub struct StatusWriter {
    file: File,
    status: Status,
}

impl StatusWriter {
    /// Writes the record (`seq` counts up).
    pub fn write(&mut self, status: Status) -> io::Result<()> {
        self.status = Status {
            seq: self.status.seq + 1,
            ..status
        };
        // One pwrite of 56 bytes inside the first page: a reader sees the old or the new
        // record (and a torn one fails its checksum).
        self.file.write_all_at(&self.status.encode(), 0)
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(v).map_err(io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_and_damage() {
        let s = Status {
            seq: 9,
            beat: 1234,
            waiting: true,
            ended: false,
            acked_epoch: 77,
            held_bytes: 5,
        };
        let b = s.encode();
        assert_eq!(Status::decode(&b), Some(s));
        let mut bad = b;
        bad[17] ^= 1;
        assert_eq!(Status::decode(&bad), None);
        assert_eq!(Status::decode(&b[..20]), None);
    }

    #[test]
    fn members_are_listed_with_their_status() {
        let d = tempfile::tempdir().unwrap();
        let root = HostRoot::new(d.path()).unwrap();
        let m = Member {
            name: "vm1".into(),
            pid: 1,
            api_sock: None,
            standby: Some("h2".into()),
            failover: Failover::Auto,
            max_failover_ms: Some(500),
            mem_size: 1 << 20,
            state_dir: Some("/dev/shm/vm1".into()),
        };
        let mut w = root.join(&m).unwrap();
        w.write(Status {
            beat: 5,
            ..Status::default()
        })
        .unwrap();
        let got = root.members();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, m);
        assert_eq!(got[0].1.map(|s| (s.seq, s.beat)), Some((1, 5)));
        root.leave("vm1");
        assert!(root.members().is_empty());
    }
}

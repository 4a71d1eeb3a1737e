//! CPU shares per VMM process through cgroups: v1's `cpu.shares` or v2's `cpu.weight`.
//!
//! The manager makes one parent group and a group per VM under it, so shares are relative
//! among its VMs only. Shares are given in v1 units (1024 = one default share); on v2 they are
//! converted to a weight the way container runtimes do (`1 + (shares - 2) * 9999 / 262142`).
//! A process is put back in the group it came from when its group is removed.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// v1 limits of `cpu.shares`.
pub const MIN_SHARES: u64 = 2;
/// See [`MIN_SHARES`].
pub const MAX_SHARES: u64 = 262_144;

/// Which cgroup interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The `cpu` controller's own hierarchy (`cpu.shares`).
    V1,
    /// The unified hierarchy (`cpu.weight`).
    V2,
}

/// v1 shares as a v2 weight (1..=10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(MIN_SHARES, MAX_SHARES);
    1 + (s - 2) * 9999 / 262_142
}

/// A v2 weight as v1 shares (the inverse of [`shares_to_weight`], rounded up).
pub fn weight_to_shares(weight: u64) -> u64 {
    let w = weight.clamp(1, 10_000);
    2 + ((w - 1) * 262_142).div_ceil(9999)
}

/// A cgroup hierarchy with a CPU controller.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    version: Version,
    /// Where the hierarchy is mounted.
    root: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .map_err(|e| Error::host(format!("writing {value:?} to {}", path.display()), e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::host(format!("reading {}", path.display()), e))
}

impl Hierarchy {
    /// The hierarchy at `root`, of `version` (tests point this at a plain directory).
    pub fn at(version: Version, root: impl Into<PathBuf>) -> Self {
        Self {
            version,
            root: root.into(),
        }
    }

    /// The host's CPU controller: a v1 `cpu` hierarchy if one is mounted, else the unified
    /// hierarchy if it offers `cpu`.
    pub fn detect() -> Result<Self> {
        let mounts = read(Path::new("/proc/self/mountinfo"))?;
        let mut v2 = None;
        for line in mounts.lines() {
            // "id parent major:minor root mount-point options - fstype source super-options"
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount = left.split_whitespace().nth(4).unwrap_or("");
            let mut r = right.split_whitespace();
            let fstype = r.next().unwrap_or("");
            let options = r.nth(1).unwrap_or("");
            if fstype == "cgroup" && options.split(',').any(|o| o == "cpu") {
                return Ok(Self::at(Version::V1, mount));
            }
            if fstype == "cgroup2" && v2.is_none() {
                v2 = Some(PathBuf::from(mount));
            }
        }
        if let Some(root) = v2 {
            let controllers = read(&root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "cpu") {
                return Ok(Self::at(Version::V2, root));
            }
        }
        Err(Error::Cgroup(
            "no cgroup CPU controller: neither a v1 \"cpu\" hierarchy nor a unified one offering \"cpu\" is mounted".into(),
        ))
    }

    /// Its version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Where it is mounted.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes (or reuses) group `name` under `parent` (None: the root), with CPU control
    /// enabled for its children on v2.
    pub fn group(&self, parent: Option<&Group>, name: &str) -> Result<Group> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::Invalid {
                field: "cgroup name",
                reason: format!("{name:?} is not a plain directory name"),
            });
        }
        let base = parent.map_or(self.root.clone(), |p| p.dir.clone());
        if self.version == Version::V2 {
            // Children of `base` get the cpu controller only if `base` hands it down.
            let sub = base.join("cgroup.subtree_control");
            let on = read(&sub).unwrap_or_default();
            if !on.split_whitespace().any(|c| c == "cpu") {
                write(&sub, "+cpu")?;
            }
        }
        let dir = base.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::host(format!("creating {}", dir.display()), e)),
        }
        Ok(Group {
            version: self.version,
            dir,
            root: self.root.clone(),
        })
    }

    /// The group process `pid` is in now (to put it back later).
    pub fn group_of(&self, pid: u32) -> Result<PathBuf> {
        let text = read(&PathBuf::from(format!("/proc/{pid}/cgroup")))?;
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (_id, controllers, path) = (f.next(), f.next().unwrap_or(""), f.next());
            let Some(path) = path else { continue };
            let ours = match self.version {
                Version::V1 => controllers.split(',').any(|c| c == "cpu"),
                Version::V2 => controllers.is_empty(),
            };
            if ours {
                return Ok(self.root.join(path.trim_start_matches('/')));
            }
        }
        Ok(self.root.clone())
    }
}

/// One cgroup.
#[derive(Clone, Debug)]
pub struct Group {
    version: Version,
    dir: PathBuf,
    root: PathBuf,
}

impl Group {
    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets its CPU share (v1 units).
    pub fn set_shares(&self, shares: u64) -> Result<()> {
        let shares = shares.clamp(MIN_SHARES, MAX_SHARES);
        match self.version {
            Version::V1 => write(&self.dir.join("cpu.shares"), &shares.to_string()),
            Version::V2 => write(
                &self.dir.join("cpu.weight"),
                &shares_to_weight(shares).to_string(),
            ),
        }
    }

    /// Its CPU share (v1 units; on v2 converted back from the weight).
    pub fn shares(&self) -> Result<u64> {
        let (file, v2) = match self.version {
            Version::V1 => ("cpu.shares", false),
            Version::V2 => ("cpu.weight", true),
        };
        let path = self.dir.join(file);
        let n: u64 = read(&path)?
            .trim()
            .parse()
            .map_err(|_| Error::Cgroup(format!("{} does not hold a number", path.display())))?;
        Ok(if v2 { weight_to_shares(n) } else { n })
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<()> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    /// The processes in the group.
    pub fn pids(&self) -> Result<Vec<u32>> {
        Ok(read(&self.dir.join("cgroup.procs"))?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Moves its processes to `to` (their old group; the root if None) and removes it.
    pub fn remove(&self, to: Option<&Path>) -> Result<()> {
        let to = to.unwrap_or(&self.root);
        for pid in self.pids().unwrap_or_default() {
            // A process that ended meanwhile cannot be moved; that is fine.
            let _ = write(&to.join("cgroup.procs"), &pid.to_string());
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::host(format!("removing {}", self.dir.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_trip_and_keep_order() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
        assert!(shares_to_weight(512) < shares_to_weight(1024));
        for w in [1, 39, 100, 5000, 10_000] {
            assert_eq!(shares_to_weight(weight_to_shares(w)), w);
        }
        // Out of range shares are clamped, not wrapped.
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10_000);
    }

    #[test]
    fn v2_groups_write_weights_and_enable_cpu_for_children() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let h = Hierarchy::at(Version::V2, root.path());
        let g = h.group(None, "rebound-test").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        g.set_shares(1024).unwrap();
        assert_eq!(
            std::fs::read_to_string(g.dir().join("cpu.weight")).unwrap(),
            "39"
        );
        assert_eq!(shares_to_weight(g.shares().unwrap()), 39);
        assert!(h.group(None, "../escape").is_err());
        assert!(h.group(None, "").is_err());
    }

    #[test]
    fn v1_groups_write_shares() {
        let root = tempfile::tempdir().unwrap();
        let h = Hierarchy::at(Version::V1, root.path());
        let parent = h.group(None, "p").unwrap();
        let g = h.group(Some(&parent), "vm").unwrap();
        assert_eq!(g.dir(), root.path().join("p/vm"));
        g.set_shares(1).unwrap();
        assert_eq!(
            g.shares().unwrap(),
            MIN_SHARES,
            "clamped to the kernel's floor"
        );
        g.set_shares(700).unwrap();
        assert_eq!(g.shares().unwrap(), 700);
        // A plain directory's files make rmdir fail: the error names it.
        let e = g.remove(None).unwrap_err().to_string();
        assert!(e.contains("p/vm"), "{e}");
    }
}

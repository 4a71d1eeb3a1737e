//! Network interface configuration, as Firecracker's `PUT /network-interfaces/{id}` takes it
//! (`iface_id`, `host_dev_name`, `guest_mac`), with Rebound's additions: `mtu`, `publish`
//! (the user-mode backend's forwarded ports) and `paths` (several host paths with failover).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Its id (the API path's `{iface_id}`).
    pub iface_id: String,
    /// The guest's MAC address (default: `02:00:00:00:00:NN`, NN the interface's position + 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// A TAP device on the host (created beforehand, as Firecracker expects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_dev_name: Option<String>,
    /// MTU (68 to 9000; default 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// With no `host_dev_name`: the user-mode backend (passt), forwarding these host ports to
    /// the guest: `[ADDR:]HOST_PORT[:GUEST_PORT]` (ADDR defaults to 127.0.0.1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Several TAP devices, each on its own host path; the NIC moves to a healthy one when
    /// the active one fails (instead of `host_dev_name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathConfig>,
    /// Refused if set: Rebound has no rate limiters yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Refused if set: Rebound has no rate limiters yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// One host path of a NIC with failover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// Its TAP device.
    pub host_dev_name: String,
    /// A host interface whose carrier this path depends on (e.g. the uplink the TAP is
    /// bridged to); default: the TAP itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_link: Option<String>,
    /// An IPv4 address that answers ARP through this path (a gateway or peer): probed to tell
    /// a working path from one that drops frames while its link stays up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_ip: Option<Ipv4Addr>,
}

/// A forwarded port of the user-mode backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Host address it listens on.
    pub host_addr: Ipv4Addr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl Publish {
    /// Parses `[ADDR:]HOST_PORT[:GUEST_PORT]`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config {
            field: "publish".into(),
            reason: format!("{s:?}: {why} (use [ADDR:]HOST_PORT[:GUEST_PORT])"),
        };
        let parts: Vec<&str> = s.split(':').collect();
        let port = |p: &str| -> Result<u16, Error> {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| bad("ports are 1 to 65535"))
        };
        let (addr, host, guest) = match parts.as_slice() {
            [h] => (Ipv4Addr::LOCALHOST, port(h)?, port(h)?),
            [h, g] if h.parse::<Ipv4Addr>().is_err() => (Ipv4Addr::LOCALHOST, port(h)?, port(g)?),
            [a, h] => (
                a.parse().map_err(|_| bad("not an IPv4 address"))?,
                port(h)?,
                port(h)?,
            ),
            [a, h, g] => (
                a.parse().map_err(|_| bad("not an IPv4 address"))?,
                port(h)?,
                port(g)?,
            ),
            _ => return Err(bad("too many parts")),
        };
        Ok(Self {
            host_addr: addr,
            host_port: host,
            guest_port: guest,
        })
    }

    /// passt's `--tcp-ports` form: `ADDR/HOST:GUEST`.
    pub fn passt_spec(&self) -> String {
        format!("{}/{}:{}", self.host_addr, self.host_port, self.guest_port)
    }
}

/// The guest-side addressing of a user-mode NIC (passt answers for the gateway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addressing {
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// The gateway (host loopback is reached through it).
    pub gateway: Ipv4Addr,
    /// The gateway's MAC address.
    pub gateway_mac: [u8; 6],
    /// MTU announced (DHCP).
    pub mtu: u16,
}

/// Default MTU.
pub const DEFAULT_MTU: u16 = 1500;

impl NetworkInterface {
    /// The guest MAC: as given, or the default for position `index`.
    pub fn mac(&self, index: usize) -> Result<[u8; 6], Error> {
        match &self.guest_mac {
            Some(m) => rebound_devices::net::parse_mac(m).ok_or_else(|| Error::Config {
                field: "guest_mac".into(),
                reason: format!("{m:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
            }),
            None => Ok([0x02, 0, 0, 0, 0, (index + 1) as u8]),
        }
    }

    /// Checks the interface on its own (paths, names, ports; not the host's devices).
    pub fn validate(&self, index: usize) -> Result<(), Error> {
        let bad = |field: &str, reason: String| {
            Err(Error::Config {
                field: field.into(),
                reason,
            })
        };
        if self.iface_id.is_empty()
            || !self
                .iface_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return bad(
                "iface_id",
                format!("{:?}: use letters, digits, '_', '-', '.'", self.iface_id),
            );
        }
        if self.rx_rate_limiter.is_some() || self.tx_rate_limiter.is_some() {
            return bad(
                "rx_rate_limiter",
                "rate limiters are not supported yet".into(),
            );
        }
        let mac = self.mac(index)?;
        let mtu = self.mtu.unwrap_or(DEFAULT_MTU);
        rebound_vmm::config::check_nics([(mac, mtu)].into_iter()).map_err(|e| Error::Config {
            field: if matches!(e, rebound_vmm::ConfigError::Nic { ref reason, .. } if reason.starts_with("mtu")) {
                "mtu".into()
            } else {
                "guest_mac".into()
            },
            reason: e.to_string(),
        })?;
        let backends = [
            self.host_dev_name.is_some(),
            !self.paths.is_empty(),
            !self.publish.is_empty(),
        ];
        if backends.iter().filter(|b| **b).count() > 1 {
            return bad(
                "host_dev_name",
                "give one of host_dev_name (a TAP), paths (TAPs with failover) or publish (user-mode)"
                    .into(),
            );
        }
        for p in &self.publish {
            Publish::parse(p)?;
        }
        if self.paths.len() == 1 {
            return bad(
                "paths",
                "failover needs at least two paths (one path: use host_dev_name)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface() -> NetworkInterface {
        NetworkInterface {
            iface_id: "eth0".into(),
            guest_mac: None,
            host_dev_name: None,
            mtu: None,
            publish: Vec::new(),
            paths: Vec::new(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn publish_forms() {
        let p = Publish::parse("6379").unwrap();
        assert_eq!(
            (p.host_addr, p.host_port, p.guest_port),
            (Ipv4Addr::LOCALHOST, 6379, 6379)
        );
        let p = Publish::parse("16379:6379").unwrap();
        assert_eq!((p.host_port, p.guest_port), (16379, 6379));
        let p = Publish::parse("127.0.0.2:80:8080").unwrap();
        assert_eq!(p.passt_spec(), "127.0.0.2/80:8080");
        let p = Publish::parse("127.0.0.1:6379").unwrap();
        assert_eq!((p.host_port, p.guest_port), (6379, 6379));
        for bad in ["", "0", "x:1:2", "1:2:3:4", "70000", "1.2.3:4"] {
            assert!(Publish::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interfaces_are_checked() {
        assert!(iface().validate(0).is_ok());
        assert_eq!(iface().mac(2).unwrap(), [2, 0, 0, 0, 0, 3]);
        let mut i = iface();
        i.guest_mac = Some("01:00:00:00:00:01".into());
        assert!(i.validate(0).unwrap_err().to_string().contains("unicast"));
        let mut i = iface();
        i.guest_mac = Some("zz".into());
        assert!(
            i.validate(0)
                .unwrap_err()
                .to_string()
                .starts_with("guest_mac")
        );
        let mut i = iface();
        i.host_dev_name = Some("tap0".into());
        i.publish = vec!["6379".into()];
        assert!(i.validate(0).is_err());
        let mut i = iface();
        i.tx_rate_limiter = Some(serde_json::json!({}));
        assert!(
            i.validate(0)
                .unwrap_err()
                .to_string()
                .contains("rate limiters")
        );
        let mut i = iface();
        i.iface_id = "a/b".into();
        assert!(i.validate(0).is_err());
        let mut i = iface();
        i.mtu = Some(20);
        assert!(i.validate(0).unwrap_err().to_string().contains("mtu"));
    }
}

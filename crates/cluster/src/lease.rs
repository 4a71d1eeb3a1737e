//! Fencing through etcd (multi-host): each host agent holds a lease, renewed every heartbeat
//! interval; VM `NAME`'s owner is the host named by the key `/rebound/vms/NAME`, put under that
//! host's lease.
//!
//! - A host may run its VMs only while its lease is provably alive: until `grace` after it
//!   *sent* the last keep-alive etcd answered. Past that it is [`Standing::Unsure`] and its
//!   agent stops its VMMs (SIGSTOP: no output, no writes); if etcd says the lease is gone, it
//!   is [`Standing::Lost`] and its VMMs are killed.
//! - A standby takes a VM over only through etcd: if the owner's host is dead (no heartbeats),
//!   it revokes that host's lease, waits `grace` (by then the old host has stopped its VMMs,
//!   since no keep-alive it sends after the revoke can succeed), and puts the key under its own
//!   lease in a transaction that requires the key to be absent. If the owner's host is alive
//!   and reports the VM dead, it waits for that host to delete the key ([`Fence::release`]).
//!   Two hosts can never both hold the key, and the old one stops before the new one starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};

use crate::fence::{Fence, Standing, Watch};

/// How long a lease lives in etcd without keep-alives (it is revoked long before by a standby
/// that takes over; this only cleans up after hosts that went away for good).
const TTL_S: i64 = 10;
/// How long one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an agent starting waits for etcd to grant it a lease.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

fn key(vm: &str) -> String {
    format!("/rebound/vms/{vm}")
}

struct Shared {
    base: Instant,
    /// Monotonic ns since `base` until which the lease is provably alive.
    valid_until: AtomicU64,
    revoked: AtomicBool,
    lease: AtomicI64,
}

impl Shared {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// The etcd fence of one host.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    host: String,
    endpoint: String,
    grace: Duration,
    interval: Duration,
    shared: Arc<Shared>,
    keeper: Option<tokio::task::JoinHandle<()>>,
    /// VMs whose key this host took from a dead host (revoking its lease), and when.
    stolen: HashMap<String, Instant>,
    /// The lease's loss was reported (a new one is taken at the next look).
    lost_told: bool,
}

fn etcd_err(e: impl std::fmt::Display) -> String {
    format!("etcd: {e}")
}

fn options(interval: Duration) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(interval.max(Duration::from_millis(100)), REQUEST_TIMEOUT)
        .with_keep_alive_while_idle(true)
}

/// Runs one etcd request on `rt`, bounded by [`REQUEST_TIMEOUT`] whatever the connection does.
fn call<T>(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    // The timer is made inside the runtime (it needs its reactor).
    match rt.block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, f).await }) {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(etcd_err("no answer in time")),
    }
}

impl Etcd {
    /// Connects to etcd at `endpoint` (host:port or a URL) as host `host`, with a lease renewed
    /// every `interval`; a lease not renewed for `grace` is not trusted.
    pub fn connect(
        endpoint: &str,
        host: &str,
        interval: Duration,
        grace: Duration,
    ) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(etcd_err)?;
        let client = rt
            .block_on(async {
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    Client::connect([endpoint], Some(options(interval))),
                )
                .await
            })
            .map_err(|_| etcd_err("no answer in time"))?
            .map_err(etcd_err)?;
        let mut e = Self {
            rt,
            client,
            host: host.to_string(),
            endpoint: endpoint.to_string(),
            grace,
            interval,
            shared: Arc::new(Shared {
                base: Instant::now(),
                valid_until: AtomicU64::new(0),
                revoked: AtomicBool::new(false),
                lease: AtomicI64::new(0),
            }),
            keeper: None,
            stolen: HashMap::new(),
            lost_told: false,
        };
        // An etcd that just started (or lost its leader) refuses leases for a moment.
        let t0 = Instant::now();
        loop {
            match e.new_lease() {
                Ok(()) => return Ok(e),
                Err(why) if t0.elapsed() > STARTUP_PATIENCE => return Err(why),
                Err(why) => {
                    tracing::info!("no etcd lease yet: {why}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Grants a fresh lease and starts renewing it.
    fn new_lease(&mut self) -> Result<(), String> {
        let mut client = self.client.clone();
        let sent = self.shared.now();
        let id = call(&self.rt, client.lease_grant(TTL_S, None))?.id();
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        let shared = Arc::clone(&self.shared);
        shared.lease.store(id, Ordering::Release);
        shared.revoked.store(false, Ordering::Release);
        shared
            .valid_until
            .store(sent + self.grace.as_nanos() as u64, Ordering::Release);
        let (interval, grace) = (self.interval, self.grace.as_nanos() as u64);
        let (endpoint, first) = (self.endpoint.clone(), self.client.clone());
        self.keeper = Some(
            self.rt
                .spawn(keep_alive(endpoint, first, id, shared, interval, grace)),
        );
        tracing::info!(lease = id, "etcd lease granted");
        Ok(())
    }

    fn lease(&self) -> i64 {
        self.shared.lease.load(Ordering::Acquire)
    }

    fn put_mine(&mut self, vm: &str) -> Result<bool, String> {
        let (k, host, lease) = (key(vm), self.host.clone(), self.lease());
        let mut client = self.client.clone();
        let work = async move {
            let put = TxnOp::put(
                k.as_str(),
                host.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            );
            // Absent, or already this host's (then moved under this lease).
            let absent = Txn::new()
                .when([Compare::version(k.as_str(), CompareOp::Equal, 0)])
                .and_then([put.clone()]);
            if client.txn(absent).await.map_err(etcd_err)?.succeeded() {
                return Ok(true);
            }
            let degraded = format!("{host}!");
            for v in [host.as_str(), degraded.as_str()] {
                let again = TxnOp::put(k.as_str(), v, Some(PutOptions::new().with_lease(lease)));
                let mine = Txn::new()
                    .when([Compare::value(k.as_str(), CompareOp::Equal, v)])
                    .and_then([again]);
                if client.txn(mine).await.map_err(etcd_err)?.succeeded() {
                    return Ok(true);
                }
            }
            let owner = client
                .get(k.as_str(), None)
                .await
                .map_err(etcd_err)?
                .kvs()
                .first()
                .and_then(|kv| kv.value_str().ok().map(str::to_string))
                .unwrap_or_default();
            Err(format!("VM {vm} is owned by host {owner}"))
        };
        match self
            .rt
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, work).await })
        {
            Ok(r) => r,
            Err(_) => Err(etcd_err("no answer in time")),
        }
    }
}

/// Renews lease `id` every `interval`; each answer proves it alive until `grace` after the
/// request was sent.
async fn keep_alive(
    endpoint: String,
    first: Client,
    id: i64,
    shared: Arc<Shared>,
    interval: Duration,
    grace: u64,
) {
    // The first round on the connection the lease was granted on (no new connection to wait
    // for: the lease is renewed at once).
    let mut first = Some(first);
    loop {
        // A fresh connection after any failure: one that stalled during a partition can take
        // TCP's retransmission backoff (tens of seconds) to come back.
        let connected = match first.take() {
            Some(c) => Ok(Ok(c)),
            None => {
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    Client::connect([endpoint.as_str()], Some(options(interval))),
                )
                .await
            }
        };
        let mut client = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!("etcd connect: {e}");
                tokio::time::sleep(interval).await;
                continue;
            }
            Err(_) => {
                tracing::debug!("etcd connect: no answer in time");
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        // After a failure: is the lease still there at all? (A revoked lease cannot be kept
        // alive: the stream fails instead of answering TTL 0.)
        if let Ok(Ok(r)) =
            tokio::time::timeout(REQUEST_TIMEOUT, client.lease_time_to_live(id, None)).await
            && r.ttl() <= 0
        {
            shared.revoked.store(true, Ordering::Release);
            return;
        }
        let opened = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(id)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(ks)) => ks,
            Ok(Err(e)) => {
                tracing::debug!("etcd keep-alive: {e}");
                tokio::time::sleep(interval).await;
                continue;
            }
            Err(e) => {
                tracing::debug!("etcd keep-alive: {e}");
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        loop {
            let sent = shared.now();
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    shared.valid_until.fetch_max(sent + grace, Ordering::AcqRel);
                }
                Ok(Ok(Some(_))) => {
                    // TTL 0: the lease is gone (revoked by a standby, or expired).
                    shared.revoked.store(true, Ordering::Release);
                    return;
                }
                other => {
                    tracing::debug!("etcd keep-alive failed: {other:?}");
                    break;
                }
            }
            tokio::time::sleep(interval).await;
        }
        tokio::time::sleep(interval).await;
    }
}

impl Fence for Etcd {
    fn watch(&self) -> Watch {
        let shared = Arc::clone(&self.shared);
        Watch::new(move || {
            if shared.revoked.load(Ordering::Acquire) {
                Standing::Lost
            } else if shared.now() < shared.valid_until.load(Ordering::Acquire) {
                Standing::Owner
            } else {
                Standing::Unsure
            }
        })
    }

    fn standing(&mut self) -> Standing {
        if self.shared.revoked.load(Ordering::Acquire) {
            // Lost is said once before a new lease is taken (at the next call): the VMMs are
            // ended before anything could see this host as the owner again.
            if !self.lost_told {
                self.lost_told = true;
                return Standing::Lost;
            }
            // Start over with a new lease for what runs here later.
            if let Err(e) = self.new_lease() {
                tracing::warn!("cannot get a new etcd lease: {e}");
                self.shared.revoked.store(true, Ordering::Release);
                return Standing::Lost;
            }
            self.lost_told = false;
        }
        if self.shared.now() < self.shared.valid_until.load(Ordering::Acquire) {
            Standing::Owner
        } else {
            Standing::Unsure
        }
    }

    fn claim(&mut self, vm: &str) -> Result<bool, String> {
        match self.put_mine(vm) {
            Ok(b) => Ok(b),
            Err(e) if e.starts_with("etcd:") => {
                tracing::debug!(vm, "cannot record the VM's owner yet: {e}");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn release(&mut self, vm: &str) {
        let (k, host) = (key(vm), self.host.clone());
        let mut client = self.client.clone();
        let del = Txn::new()
            .when([Compare::value(k.as_str(), CompareOp::Equal, host.as_str())])
            .and_then([TxnOp::delete(k.as_str(), None)]);
        let r = call(&self.rt, client.txn(del));
        if let Err(e) = r {
            tracing::warn!(vm, "cannot give the VM up in etcd: {e}");
        }
    }

    fn take(&mut self, vm: &str, from: &str, from_dead: bool) -> Result<bool, String> {
        if let Some(at) = self.stolen.get(vm) {
            // Its old host's lease was revoked: by `grace` later that host has stopped its
            // VMMs (none of its keep-alives can succeed after the revoke).
            if at.elapsed() < self.grace {
                return Ok(false);
            }
            self.stolen.remove(vm);
            return Ok(true);
        }
        let k = key(vm);
        let mut client = self.client.clone();
        let current = call(&self.rt, client.get(k.as_str(), None))?
            .kvs()
            .first()
            .map(|kv| {
                (
                    kv.value_str().unwrap_or("").to_string(),
                    kv.lease(),
                    kv.mod_revision(),
                )
            });
        match current {
            // Given up by its host (it died there), or its lease expired (that host stopped
            // its VMMs long before).
            None => self.put_mine(vm),
            Some((owner, ..)) if owner == self.host => Ok(true),
            Some((owner, ..)) if owner == format!("{from}!") => Err(format!(
                "VM {vm} ran on host {from} without a standby: this standby's copy is older than what it released (not taken over)"
            )),
            Some((owner, ..)) if owner != from => Err(format!("VM {vm} is owned by host {owner}")),
            // Its host lives: it gives the VM up itself.
            Some(_) if !from_dead => Ok(false),
            Some((_, lease, revision)) => {
                // Take the key while it still says the old host has a standby here (it cannot
                // then record that it runs on without one), then end that host's lease.
                let (host, mine) = (self.host.clone(), self.lease());
                let steal = Txn::new()
                    .when([Compare::mod_revision(
                        k.as_str(),
                        CompareOp::Equal,
                        revision,
                    )])
                    .and_then([TxnOp::put(
                        k.as_str(),
                        host.as_str(),
                        Some(PutOptions::new().with_lease(mine)),
                    )]);
                let mut client = self.client.clone();
                if !call(&self.rt, client.txn(steal))?.succeeded() {
                    return Ok(false);
                }
                let mut client = self.client.clone();
                match call(&self.rt, client.lease_revoke(lease)) {
                    Ok(_) => tracing::warn!(vm, from, lease, "revoked the dead host's etcd lease"),
                    // Revoked already (another of its VMs) or expired meanwhile.
                    Err(e) => tracing::debug!(vm, from, "revoking lease {lease}: {e}"),
                }
                self.stolen.insert(vm.to_string(), Instant::now());
                Ok(false)
            }
        }
    }

    fn degrade(&mut self, vm: &str) -> Result<bool, String> {
        let (k, host, lease) = (key(vm), self.host.clone(), self.lease());
        let degraded = format!("{host}!");
        let txn = Txn::new()
            .when([Compare::value(k.as_str(), CompareOp::Equal, host.as_str())])
            .and_then([TxnOp::put(
                k.as_str(),
                degraded.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(k.as_str(), None)]);
        let mut client = self.client.clone();
        let r = call(&self.rt, client.txn(txn))?;
        if r.succeeded() {
            return Ok(true);
        }
        // Already so?
        let already = r.op_responses().into_iter().any(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.value_str().is_ok_and(|v| v == degraded)),
            _ => false,
        });
        Ok(already)
    }

    fn replicated(&mut self, vm: &str) {
        let (k, host, lease) = (key(vm), self.host.clone(), self.lease());
        let degraded = format!("{host}!");
        let txn = Txn::new()
            .when([Compare::value(
                k.as_str(),
                CompareOp::Equal,
                degraded.as_str(),
            )])
            .and_then([TxnOp::put(
                k.as_str(),
                host.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client.clone();
        if let Err(e) = call(&self.rt, client.txn(txn)) {
            tracing::warn!(vm, "cannot record that the VM has a standby again: {e}");
        }
    }

    fn describe(&self) -> String {
        format!("etcd at {} (lease {:x})", self.endpoint, self.lease())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }
}

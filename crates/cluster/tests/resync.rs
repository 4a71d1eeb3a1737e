//! A resync over a real TCP connection into a real hot standby directory: the primary's sink
//! copies memory while "the VM" keeps writing (also in the middle of the copy), acknowledges
//! checkpoints to the engine before the standby is in sync, and the standby ends up with
//! exactly the memory of the last checkpoint. The memory here is a byte vector standing in for
//! a VM, since what is tested is the protocol and the stores, not KVM.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use rebound_checkpoint::sink::{CheckpointData, LiveMemory, Sink};
use rebound_checkpoint::state_dir::{OutputRecord, StateDir};
use rebound_checkpoint::strategy::PageSource;
use rebound_cluster::Remote;
use rebound_cluster::hot::HotStore;
use rebound_snapshot::{DirtySet, PAGE_SIZE};
use rebound_vmm::persist::{SavedState, VmDescriptor};

const NPAGES: u64 = 1024;
const PAGE: usize = PAGE_SIZE as usize;

/// Guest memory and the pages written since the last acknowledged checkpoint.
struct Memory {
    bytes: Vec<u8>,
    dirty: BTreeSet<u64>,
    seq: u64,
}

impl Memory {
    fn write(&mut self, p: u64) {
        self.seq += 1;
        let at = p as usize * PAGE;
        self.bytes[at..at + 8].copy_from_slice(&self.seq.to_le_bytes());
        self.bytes[at + PAGE - 8..at + PAGE].copy_from_slice(&self.seq.to_le_bytes());
        self.dirty.insert(p);
    }
}

/// Reads pages as a running VM's would be read: each copy is followed by a guest write to the
/// same page, so every copied page is stale at once and must come again from the dirty set.
struct Live<'a>(&'a Mutex<Memory>, &'a Mutex<u64>);

impl LiveMemory for Live<'_> {
    fn copy_page(&self, p: u64, buf: &mut [u8]) -> bool {
        let mut m = self.0.lock().unwrap();
        let at = p as usize * PAGE;
        buf.copy_from_slice(&m.bytes[at..at + PAGE]);
        if p.is_multiple_of(3) {
            m.write(p);
        }
        *self.1.lock().unwrap() += 1;
        // Slow enough that the copy spreads over several checkpoints.
        std::thread::sleep(Duration::from_micros(100));
        true
    }
}

struct Frozen(Vec<u8>);

impl PageSource for Frozen {
    fn page(&self, p: u64) -> Option<&[u8]> {
        self.0.get(p as usize * PAGE..(p as usize + 1) * PAGE)
    }
}

#[test]
fn a_resync_copies_while_the_vm_runs_and_ends_with_the_last_checkpoints_memory() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    // A hot standby keeps memory on tmpfs.
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = tmp.path().join("vm.hot");
    // An old copy the standby kept: it must be unusable as soon as the resync starts.
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("stale"), b"old").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let store_path = path.clone();
    std::thread::spawn(move || {
        let mut store = HotStore::new(&store_path);
        let _ = rebound_cluster::standby::serve_into(&listener, &mut store, None);
    });

    let mut memory = Memory {
        bytes: vec![0; NPAGES as usize * PAGE],
        dirty: BTreeSet::new(),
        seq: 0,
    };
    // 600 pages of data, the rest zero.
    for p in 0..600 {
        memory.write(p);
    }
    memory.dirty.clear();
    let memory = Mutex::new(memory);
    let copied = Mutex::new(0u64);
    let state = SavedState {
        vm: VmDescriptor {
            mem_size: NPAGES * PAGE_SIZE,
            vcpus: 1,
            image: "test".into(),
            boot_args: String::new(),
            disk: None,
            abi_version: 0,
        },
        components: Default::default(),
    };
    let mut sink = Remote::new(&addr, "vm");
    let mut pending = DirtySet::new(NPAGES);
    let mut last = Vec::new();
    let mut synced_at = None;
    let mut in_sync = 0;
    for epoch in 1..=200u64 {
        // The checkpoint: the VM is frozen.
        let (frozen, data) = {
            let mut m = memory.lock().unwrap();
            for &p in &m.dirty {
                pending.insert(p);
            }
            m.dirty.clear();
            let mut data = DirtySet::new(NPAGES);
            for p in 0..NPAGES {
                if m.bytes[p as usize * PAGE..(p as usize + 1) * PAGE]
                    .iter()
                    .any(|&b| b != 0)
                {
                    data.insert(p);
                }
            }
            (Frozen(m.bytes.clone()), data)
        };
        let full = epoch == 1 || sink.wants_full();
        let cp = CheckpointData {
            epoch,
            id: epoch * 7,
            follows: None,
            state: &state,
            mem_size: NPAGES * PAGE_SIZE,
            pages: &pending,
            full,
            data: full.then_some(&data),
            source: &frozen,
            output: &OutputRecord {
                offset: 0,
                bytes: Vec::new(),
            },
        };
        sink.commit(&cp)
            .unwrap_or_else(|e| panic!("epoch {epoch}: {e}"));
        pending.clear();
        if epoch == 1 {
            assert!(
                !path.join("stale").exists(),
                "the old copy is retired first"
            );
        }
        last = frozen.0;
        let dir = StateDir::open(&path).ok();
        let head = dir.and_then(|d| d.read_head().ok().flatten());
        // In sync: every checkpoint is stored by the time it is acknowledged (the full one
        // that ends the copy may be too, by chance, but not the ones after it).
        if head.is_some_and(|h| h.epoch == epoch) {
            in_sync += 1;
            synced_at.get_or_insert(epoch);
            if in_sync == 5 {
                break;
            }
        } else {
            in_sync = 0;
            synced_at = None;
        }
        // The VM runs: the sink copies, the guest writes.
        sink.between(&Live(&memory, &copied));
        let mut m = memory.lock().unwrap();
        for i in 0..5 {
            m.write((epoch * 37 + i * 101) % NPAGES);
        }
    }
    let synced_at = synced_at.expect("the standby got in sync");
    assert!(
        synced_at >= 4,
        "the copy spread over several checkpoints (in sync at epoch {synced_at})"
    );
    assert!(
        *copied.lock().unwrap() >= 600,
        "every data page copied live"
    );
    let dir = StateDir::open(&path).unwrap();
    let stored = std::fs::read(dir.memory()).unwrap();
    assert_eq!(stored.len(), last.len());
    let differ: Vec<usize> = (0..NPAGES as usize)
        .filter(|&p| stored[p * PAGE..(p + 1) * PAGE] != last[p * PAGE..(p + 1) * PAGE])
        .collect();
    assert!(differ.is_empty(), "pages that differ: {differ:?}");
}

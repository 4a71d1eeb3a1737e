//! The block-state strategy on real KVM: pages written in consecutive epochs move between their
//! two homes; a rollback after several epochs gives back the last checkpoint's memory byte for
//! byte; the kernel's mappings of guest memory stay few; when protection stops, guest memory is
//! its memfd again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_checkpoint::{Engine, EngineConfig, OutputCommit, StrategyKind};
use rebound_devices::console::SharedBuffer;
use rebound_vmm::{GuestImage, Vm, VmConfig};

fn launch(args: &str) -> (Arc<Vm>, Arc<OutputCommit>) {
    let out = SharedBuffer::new();
    let oc = OutputCommit::new(Box::new(out));
    let config = VmConfig {
        vcpu_count: 1,
        mem_size_mib: 64,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: args.into(),
        disk: None,
        shared: Vec::new(),
        cache: None,
        nics: Vec::new(),
        net_journal: None,
        disk_journal: None,
    };
    let vm = Arc::new(Vm::launch(&config, oc.writer()).expect("launch"));
    (vm, oc)
}

/// All of guest memory, read while the VM is frozen.
fn memory(vm: &Vm) -> Vec<u8> {
    let f = vm.freeze().unwrap();
    f.all_memory().unwrap().to_vec()
}

/// Waits until guest memory is no longer `than` (the guest wrote).
fn wait_changed(vm: &Vm, than: &[u8]) {
    let t0 = Instant::now();
    loop {
        let f = vm.freeze().unwrap();
        if f.all_memory().unwrap() != than {
            return;
        }
        drop(f);
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the guest never wrote"
        );
        // Let the guest run between looks: freezing back to back would starve it.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Mappings (VMAs) of this process inside guest memory: start, end, file offset, file.
fn mappings(vm: &Vm) -> Vec<(u64, u64, u64, String)> {
    let (base, len) = vm.host_memory_range();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (s, e) = f.next()?.split_once('-')?;
            let offset = u64::from_str_radix(f.nth(1)?, 16).ok()?;
            let file = f.nth(2).unwrap_or("").to_string();
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
                offset,
                file,
            ))
        })
        .filter(|&(s, e, _, _)| s >= base && e <= base + len)
        .collect()
}

/// Every page holding data is among the pages the VM says may hold data.
fn data_pages_cover_memory(vm: &Vm) {
    let f = vm.freeze().unwrap();
    // First: reading memory below maps (allocates) its holes.
    let data = f.data_pages();
    let mem = f.all_memory().unwrap();
    for (p, page) in mem.chunks_exact(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            assert!(data.contains(p as u64), "page {p:#x} holds data unseen");
        }
    }
}

#[test]
fn block_state_rollback_gives_back_the_checkpoint_byte_for_byte() {
    let (vm, oc) = launch("dirty 64");
    let engine = Engine::start(
        vm.clone(),
        oc,
        EngineConfig {
            interval: None,
            strategy: StrategyKind::BlockState,
        },
        vec![],
    )
    .unwrap();
    for cycle in 0..20 {
        // Several epochs in which the guest writes its 64 pages again (each first write moves a
        // page to its other home, then the checkpoint makes that home its image's).
        for _ in 0..3 {
            let before = memory(&vm);
            wait_changed(&vm, &before);
            let r = engine.checkpoint().unwrap();
            assert!(r.dirty_pages > 0, "cycle {cycle}: {r:?}");
        }
        vm.pause().unwrap();
        engine.checkpoint().unwrap();
        let image = memory(&vm);
        vm.resume().unwrap();
        wait_changed(&vm, &image);
        vm.pause().unwrap();
        engine.rollback().unwrap();
        let back = memory(&vm);
        let differ = image
            .chunks_exact(4096)
            .zip(back.chunks_exact(4096))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ, 0,
            "cycle {cycle}: {differ} pages differ after rollback"
        );
        vm.resume().unwrap();
        // And the guest goes on writing over the rolled-back memory.
        wait_changed(&vm, &image);
    }
    // Neighbouring pages mapped from one home are one mapping: the kernel holds one per run of
    // pages in a home, whatever the number of moves (80 epochs of 64 pages moved here). Read
    // with the guest paused: a write moving a page meanwhile splits a mapping for a moment.
    vm.pause().unwrap();
    let maps = mappings(&vm);
    vm.resume().unwrap();
    for w in maps.windows(2) {
        let ((s, e, off, file), (_, _, next_off, next_file)) = (&w[0], &w[1]);
        assert!(
            !(file == next_file && off + (e - s) == *next_off),
            "mergeable neighbours left apart: {maps:x?}"
        );
    }
    assert!(maps.len() <= 2 * 80, "{} mappings: {maps:x?}", maps.len());
    data_pages_cover_memory(&vm);
    let stats = engine.stats();
    assert_eq!(stats.rollbacks, 20);
    assert!(stats.lost.is_none(), "{stats:?}");
    engine.stop();
    // Protection stopped: guest memory is one mapping of its memfd again, and still right.
    let maps = mappings(&vm);
    assert_eq!(maps.len(), 1, "{maps:x?}");
    assert!(maps[0].3.contains("rebound-guest-memory") && !maps[0].3.contains("home-b"));
    data_pages_cover_memory(&vm);
    let m = memory(&vm);
    wait_changed(&vm, &m);
    vm.stop();
    vm.wait();
}

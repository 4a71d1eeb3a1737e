//! The host memory manager over 8 real VMs: lower the budget by half and the VMs' host memory
//! falls below it with every guest running and its working data intact; raise it back and the
//! memory returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rebound_devices::console::SharedBuffer;
use rebound_memory::PAGES_PER_MIB;
use rebound_memory::manager::{LocalMember, Manager, Member, Settings};
use rebound_memory::part::MemoryPart;
use rebound_memory::pressure::HostMemory;
use rebound_vmm::{GuestImage, Vm, VmConfig, VmOutcome};

fn launch(args: &str) -> (Arc<Vm>, SharedBuffer) {
    let config = VmConfig {
        vcpu_count: 1,
        mem_size_mib: 128,
        image: GuestImage::from_bytes("testguest", rebound_guests::TESTGUEST),
        boot_args: args.into(),
        disk: None,
        shared: Vec::new(),
        cache: None,
        nics: Vec::new(),
        net_journal: None,
        disk_journal: None,
    };
    let out = SharedBuffer::new();
    let vm = Vm::launch(&config, Box::new(out.clone())).expect("launch");
    (Arc::new(vm), out)
}

fn wait_for(out: &SharedBuffer, what: &str) {
    let t0 = Instant::now();
    while !out.text().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: {}",
            out.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn resident(vms: &[(Arc<Vm>, SharedBuffer, MemoryPart)]) -> u64 {
    vms.iter().map(|(vm, _, _)| vm.resident_pages()).sum()
}

#[test]
fn halving_the_budget_of_8_vms_squeezes_them_below_it_and_raising_it_gives_memory_back() {
    const N: usize = 8;
    let vms: Vec<_> = (0..N)
        .map(|_| {
            let (vm, out) = launch("memhold 16 24 24");
            (vm, out, MemoryPart::default())
        })
        .collect();
    for (_, out, _) in &vms {
        wait_for(out, "memhold ready");
    }
    let members: Vec<Box<dyn Member>> = vms
        .iter()
        .enumerate()
        .map(|(i, (vm, _, part))| {
            Box::new(LocalMember {
                name: format!("vm{i}"),
                vm: vm.clone(),
                part: part.clone(),
            }) as Box<dyn Member>
        })
        .collect();
    // The test's own budget decides (the host's spare memory is far above it).
    let host = HostMemory::default();
    let full = resident(&vms);
    let mut manager = Manager::new(
        Settings {
            budget_pages: full,
            min_pages: 8 * PAGES_PER_MIB,
            ..Settings::default()
        },
        members,
    );
    manager.tick(&host);

    let half = full / 2;
    manager.set_budget(half);
    let t0 = Instant::now();
    while resident(&vms) > half {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "resident {} over the budget {half}",
            resident(&vms)
        );
        manager.tick(&host);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut answered = 0;
    for (vm, out, part) in &vms {
        assert!(vm.outcome().is_none(), "{}", out.text());
        let v = part.view(Some(vm));
        assert!(v.stats.requests > 0, "{v:?}");
        answered += v.stats.answered;
    }
    assert!(answered > 0);
    let given: u64 = vms.iter().map(|(_, _, p)| p.view(None).given_pages).sum();
    assert!(given > 0);

    // Budget back: the guests are told they may take back what they gave.
    manager.set_budget(full * 2);
    let t0 = Instant::now();
    loop {
        manager.tick(&host);
        let owed: u64 = vms.iter().map(|(_, _, p)| p.view(None).given_pages).sum();
        if owed == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "still owed {owed}: {:#?}",
            vms.iter()
                .map(|(vm, out, p)| (
                    p.view(Some(vm)),
                    out.text()
                        .lines()
                        .rev()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join("|")
                ))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let taken: u64 = vms
        .iter()
        .map(|(_, _, p)| p.view(None).stats.taken_back_pages)
        .sum();
    assert!(taken > 0);
    // The guests refill their caches: host memory rises back toward where it was.
    let t0 = Instant::now();
    while resident(&vms) < full / 4 * 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "resident {} of {full}",
            resident(&vms)
        );
        manager.tick(&host);
        std::thread::sleep(Duration::from_millis(20));
    }

    for (vm, out, _) in &vms {
        vm.request_shutdown().expect("shutdown");
        let outcome = vm.wait_timeout(Duration::from_secs(60)).expect("ends");
        let text = out.text();
        assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{text}");
        assert!(text.contains(", 0 bad,"), "{text}");
    }
}

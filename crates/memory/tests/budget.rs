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
            "resident {} over the budget {half}: {:#?}",
            resident(&vms),
            vms.iter()
                .map(|(vm, _, p)| p.view(Some(vm)))
                .collect::<Vec<_>>()
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
    // The guests refill their caches: host memory rises back, well above the halved budget.
    // Not back to `full`, nor to a fixed 3/4 of it (the old bound, met in about half the runs
    // on a loaded host): `full` counted each guest's swap area, resident at the start, which
    // stays given back once empty; and a guest is owed only what the host measured it gave (a
    // claim is capped by the fall in resident memory, which a guest's own refill in between
    // makes smaller), so some caches come back smaller than they were. Seen: 70-75% of `full`.
    let t0 = Instant::now();
    while resident(&vms) < full / 5 * 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "resident {} of {full}: {:#?}",
            resident(&vms),
            vms.iter()
                .map(|(vm, _, _)| vm.memory_report())
                .collect::<Vec<_>>()
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

#[test]
fn a_guest_that_ignores_requests_is_brought_to_its_target_by_moving_its_swap_class_out() {
    // Never answers; half of its 16 MiB of working data sits in its 16 MiB swap area.
    let (vm, out) = launch("memhold 16 4 16 0 8");
    wait_for(&out, "memhold ready");
    let part = MemoryPart::default();
    let before = vm.resident_pages();
    // 12 MiB less: only the swap class (8 MiB of data, 8 MiB of zeros) can give it.
    let target_mib = before / PAGES_PER_MIB - 12;
    part.set_target(&vm, target_mib, Some(20)).expect("target");
    assert!(
        part.wait_reached(&vm, Duration::from_secs(30)),
        "{:?}",
        part.view(Some(&vm))
    );
    let v = part.view(Some(&vm));
    assert!(v.stats.unanswered >= 1, "{v:?}");
    assert_eq!(v.stats.answered, 0, "{v:?}");
    assert!(v.stats.host_paged_out >= 12 * PAGES_PER_MIB, "{v:?}");
    assert!(vm.resident_pages() <= target_mib * PAGES_PER_MIB + 64);
    // The guest reads its swapped data back (through the userfaultfd) and finds it intact.
    vm.request_shutdown().expect("shutdown");
    let outcome = vm.wait_timeout(Duration::from_secs(60)).expect("ends");
    let text = out.text();
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{text}");
    assert!(text.contains(", 0 bad,"), "{text}");
    assert!(vm.memory_report().swap.paged_in > 0);
}

#[test]
fn a_hostile_guest_beside_a_squeezed_one_hurts_only_itself() {
    let (good, good_out) = launch("memhold 16 16 16");
    let (bad, bad_out) = launch("memhostile");
    wait_for(&good_out, "memhold ready");
    let part = MemoryPart::default();
    let target = good.resident_pages() / PAGES_PER_MIB - 16;
    part.set_target(&good, target, None).expect("target");
    assert!(part.wait_reached(&good, Duration::from_secs(30)));
    let outcome = bad
        .wait_timeout(Duration::from_secs(60))
        .expect("hostile ends");
    assert_eq!(
        outcome,
        VmOutcome::Exited { status: 0 },
        "{}",
        bad_out.text()
    );
    good.request_shutdown().expect("shutdown");
    let outcome = good.wait_timeout(Duration::from_secs(60)).expect("ends");
    let text = good_out.text();
    assert_eq!(outcome, VmOutcome::Exited { status: 0 }, "{text}");
    assert!(text.contains(", 0 bad,"), "{text}");
}

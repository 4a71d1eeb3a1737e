//! Nested guests (ABI 1.10): this guest as a guest VMM running copies of itself.
//!
//! - `nestvmm MODE ARGS..`: runs `MODE ARGS..` as a nested guest to completion, its console
//!   writes passed through, and exits with its status (its output is the direct run's plus
//!   `nestvmm:` lines).
//! - `nestpost MODE ARGS..`: the same with the nested vCPU started (posted exits: it runs on a
//!   host thread of its own).
//! - `nestfault MODE`: runs a faulting mode nested, checks the fault came back as an exit, then
//!   runs `hello` nested in a new VM: the guest VMM goes on.
//! - `nesthostile`: every nested hypercall with bad arguments gets its errno.
//! - `nestbench N`: N hypercalls made directly, then N made by a nested guest and answered
//!   here (`hcbench N` nested), with their times; then the same with the nested vCPU started.
//! - `chatter N`: N deterministic lines (a payload to compare direct and nested runs).
//! - `nestslice`: time slices: one vCPU runs a two-vCPU nested guest in turn.
//! - `portread`: reads port 0x600 and prints the value; `nestio` runs it nested and answers
//!   the read with 0x12345678.

use alloc::vec;

use rebound_guest::abi::nested::{self, Areas, CREATE_SELF_IMAGE, Create, exit};
use rebound_guest::abi::{self, errno, nr};
use rebound_guest::hypercall::{self, raw};
use rebound_guest::nested::{Image, NestedVm, Outcome};
use rebound_guest::{Cpu, println, time};

const NESTED_MEM: u64 = 16 << 20;

pub fn run(mode: &str, cpu: &Cpu, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    let rest = cpu.args().split_once(' ').map_or("", |(_, r)| r.trim());
    match mode {
        "chatter" => Some(chatter(arg(1, 5))),
        "nestvmm" => Some(vmm(rest, false)),
        "nestpost" => Some(vmm(rest, true)),
        "nestfault" => Some(fault(rest)),
        "nesthostile" => Some(hostile(cpu)),
        "nestbench" => Some(match bench(arg(1, 10_000), false) {
            0 => bench(arg(1, 10_000), true),
            e => e,
        }),
        "portread" => {
            let v: u32;
            // SAFETY: a port read: Rebound answers all ones, a guest VMM what it likes.
            unsafe { core::arch::asm!("in eax, dx", in("dx") 0x600u16, out("eax") v) };
            println!("portread {v:#x}");
            Some(0)
        }
        "nestio" => Some(nest_io()),
        "nestslice" => Some(nest_slice()),
        _ => None,
    }
}

fn chatter(n: u64) -> i32 {
    let (mut a, mut b) = (0u64, 1u64);
    for i in 0..n {
        println!(
            "chatter {i}: fib {a} hash {:#018x}",
            a.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        );
        (a, b) = (b, a.wrapping_add(b));
    }
    0
}

fn console(bytes: &[u8]) {
    let _ = hypercall::console_write(bytes);
}

/// Runs `args` nested to completion; returns its exit status (or 99 if it did not exit). A
/// nested VM lost in a rollback or restore (`ESTALE`) is created again, from the start.
fn vmm(args: &str, posted: bool) -> i32 {
    for _ in 0..10 {
        match vmm_once(args, posted) {
            Err(e) if e.0 == errno::ESTALE => {
                println!("nestvmm: the nested VM was lost ({e}): creating it again");
            }
            Err(e) => {
                println!("nestvmm: NESTED_RUN failed: {e}");
                return 99;
            }
            Ok(status) => return status,
        }
    }
    99
}

fn vmm_once(args: &str, posted: bool) -> Result<i32, rebound_guest::hypercall::Errno> {
    let vm = match NestedVm::create(NESTED_MEM, 1, Image::Own, args) {
        Ok(vm) => vm,
        Err(e) => {
            println!("nestvmm: cannot create the nested VM: {e}");
            return Ok(98);
        }
    };
    let mut cpu = match vm.vcpu(0) {
        Ok(c) => c,
        Err(e) => {
            println!("nestvmm: cannot create the nested vCPU: {e}");
            return Ok(98);
        }
    };
    if posted {
        cpu.start()?;
    }
    let outcome = cpu.serve(console)?;
    let exits = cpu.host_status().exits;
    Ok(match outcome {
        Outcome::Exited(status) => {
            println!("nestvmm: nested guest exited with status {status} after {exits} exits");
            status
        }
        Outcome::Panicked(m) => {
            println!("nestvmm: nested guest panicked: {m}");
            99
        }
        Outcome::Stopped(e) => {
            println!(
                "nestvmm: nested guest stopped: exit {} vector {} rip {:#x} cr2 {:#x}",
                e.reason, e.vector, e.fault_rip, e.cr2
            );
            99
        }
    })
}

/// A nested fault is an exit for the guest VMM, which then goes on with another nested VM.
fn fault(mode: &str) -> i32 {
    let vm = match NestedVm::create(NESTED_MEM, 1, Image::Own, mode) {
        Ok(vm) => vm,
        Err(e) => {
            println!("nestfault: cannot create: {e}");
            return 1;
        }
    };
    let Ok(mut cpu) = vm.vcpu(0) else {
        println!("nestfault: cannot create the vCPU");
        return 1;
    };
    let e = match cpu.serve(console) {
        Ok(Outcome::Stopped(e)) => e,
        other => {
            println!("nestfault: expected a fault, got {other:?}");
            return 1;
        }
    };
    let base = vm.mem_gpa();
    println!(
        "nestfault: nested fault reported: exit {} vector {} error {:#x} rip {:#x} cr2 {:#x}",
        e.reason, e.vector, e.error_code, e.fault_rip, e.cr2
    );
    if e.reason != exit::FAULT && e.reason != exit::SHUTDOWN {
        println!("nestfault: not a fault");
        return 1;
    }
    // Running it again does not take the outer VM down either.
    let again = cpu.run();
    println!("nestfault: run again after the fault: {again:?}");
    drop(vm);
    match NestedVm::create(NESTED_MEM, 1, Image::Own, "hello") {
        Ok(vm2) => {
            let Ok(mut c) = vm2.vcpu(0) else {
                return 1;
            };
            match c.serve(console) {
                Ok(Outcome::Exited(0)) => {
                    println!("nestfault: the guest VMM went on (memory at {base:#x} reused)");
                    0
                }
                other => {
                    println!("nestfault: second nested guest: {other:?}");
                    1
                }
            }
        }
        Err(e) => {
            println!("nestfault: cannot create a second nested VM: {e}");
            1
        }
    }
}

/// Time slices: a nested guest with two vCPUs run by this one vCPU. Its vCPU 1 spins until
/// vCPU 0 has set up the heap, so it must give way: it comes back at the end of its slice, and
/// vCPU 0 then runs to the end.
fn nest_slice() -> i32 {
    let Ok(vm) = NestedVm::create(NESTED_MEM, 2, Image::Own, "hello") else {
        return 1;
    };
    let (Ok(mut cpu1), Ok(mut cpu0)) = (vm.vcpu(1), vm.vcpu(0)) else {
        return 1;
    };
    let mut slices = 0;
    for _ in 0..3 {
        match cpu1.run_for(2_000_000) {
            Ok(exit::TIMEOUT) => slices += 1,
            Ok(exit::INTERRUPTED) => {}
            other => {
                println!("nestslice: vCPU 1 ran: {other:?}");
                return 1;
            }
        }
    }
    println!("nestslice: vCPU 1 used {slices} slices");
    match cpu0.serve(console) {
        Ok(Outcome::Exited(0)) if slices > 0 => {
            println!("nestslice: vCPU 0 ran to the end");
            0
        }
        other => {
            println!("nestslice: {other:?}");
            1
        }
    }
}

/// A nested guest's port read answered by the guest VMM.
fn nest_io() -> i32 {
    let Ok(vm) = NestedVm::create(NESTED_MEM, 1, Image::Own, "portread") else {
        return 1;
    };
    let Ok(mut cpu) = vm.vcpu(0) else { return 1 };
    let reason = cpu.run();
    let e = cpu.exit();
    println!(
        "nestio: exit {reason:?} port {:#x} size {} data {:#x}",
        e.port, e.size, e.data
    );
    if reason != Ok(exit::IO_IN) || e.port != 0x600 {
        return 1;
    }
    cpu.answer_read(0x1234_5678);
    match cpu.serve(console) {
        Ok(Outcome::Exited(s)) => s,
        other => {
            println!("nestio: {other:?}");
            1
        }
    }
}

fn create_raw(c: &Create) -> i64 {
    raw(nr::NESTED_CREATE, &[c as *const Create as u64])
}

/// Every nested hypercall with bad arguments: each gets its errno, the VM goes on.
fn hostile(cpu: &Cpu) -> i32 {
    let failures = core::cell::Cell::new(0);
    let check = |what: &str, got: i64, want: i64| {
        if got == want {
            println!("nesthostile: {what}: {got} as expected");
        } else {
            println!("nesthostile: {what}: got {got}, expected {want}");
            failures.set(failures.get() + 1);
        }
    };
    // A 2 MiB-aligned block of our own heap for the ranges below.
    let layout = core::alloc::Layout::from_size_align(5 * NESTED_MEM as usize, 2 << 20);
    let Ok(layout) = layout else { return 1 };
    // SAFETY: a non-zero size; freed at the end with the same layout.
    let block = unsafe { alloc::alloc::alloc(layout) } as u64;
    if block == 0 {
        println!("nesthostile: no heap");
        return 1;
    }
    let args = "hello";
    let good = Create {
        mem_gpa: block,
        mem_size: nested::MIN_MEM,
        vcpus: 1,
        flags: CREATE_SELF_IMAGE,
        image_gpa: 0,
        image_len: 0,
        args_gpa: args.as_ptr() as u64,
        args_len: args.len() as u64,
    };
    let mem_end = cpu.boot_info().mem_size;

    // NESTED_CREATE
    check(
        "create: descriptor outside memory",
        raw(nr::NESTED_CREATE, &[mem_end + 4096]),
        errno::EFAULT,
    );
    check(
        "create: descriptor address overflows",
        raw(nr::NESTED_CREATE, &[u64::MAX - 8]),
        errno::EFAULT,
    );
    let cases: [(&str, Create, i64); 12] = [
        (
            "create: misaligned memory",
            Create {
                mem_gpa: block + 4096,
                ..good
            },
            errno::EINVAL,
        ),
        (
            "create: the system area",
            Create { mem_gpa: 0, ..good },
            errno::EINVAL,
        ),
        (
            "create: below the image base",
            Create {
                mem_gpa: 2 << 20,
                ..good
            },
            errno::EINVAL,
        ),
        (
            "create: past the end of memory",
            Create {
                mem_gpa: mem_end,
                ..good
            },
            errno::EFAULT,
        ),
        (
            "create: huge size",
            Create {
                mem_size: 1 << 62,
                ..good
            },
            errno::EFAULT,
        ),
        (
            "create: too small",
            Create {
                mem_size: 2 << 20,
                ..good
            },
            errno::EINVAL,
        ),
        (
            "create: no vCPU",
            Create { vcpus: 0, ..good },
            errno::EINVAL,
        ),
        (
            "create: too many vCPUs",
            Create { vcpus: 99, ..good },
            errno::EINVAL,
        ),
        (
            "create: unknown flags",
            Create {
                flags: 0x80,
                ..good
            },
            errno::EINVAL,
        ),
        (
            "create: image outside memory",
            Create {
                flags: 0,
                image_gpa: mem_end - 16,
                image_len: 4096,
                ..good
            },
            errno::EFAULT,
        ),
        (
            "create: args too long",
            Create {
                args_len: abi::BOOT_ARGS_MAX + 1,
                ..good
            },
            errno::E2BIG,
        ),
        (
            "create: args outside memory",
            Create {
                args_gpa: u64::MAX - 2,
                ..good
            },
            errno::EFAULT,
        ),
    ];
    for (what, c, want) in cases {
        check(what, create_raw(&c), want);
    }
    let junk = vec![0x7fu8; 4096];
    check(
        "create: an image that is not an SDK guest",
        create_raw(&Create {
            flags: 0,
            image_gpa: junk.as_ptr() as u64,
            image_len: 4096,
            ..good
        }),
        errno::ENOEXEC,
    );

    // Limits: four nested VMs, then ENOSPC; an overlapping range is EBUSY.
    let mut handles = vec![];
    for i in 0..nested::MAX_VMS as u64 {
        let h = create_raw(&Create {
            mem_gpa: block + i * NESTED_MEM,
            ..good
        });
        if h < 0 {
            println!("nesthostile: creating nested VM {i}: {h}");
            failures.set(failures.get() + 1);
        }
        handles.push(h as u64);
    }
    check(
        "create: a fifth nested VM",
        create_raw(&Create {
            mem_gpa: block + 4 * NESTED_MEM,
            ..good
        }),
        errno::ENOSPC,
    );
    check("destroy: first", raw(nr::NESTED_DESTROY, &[handles[0]]), 0);
    check(
        "create: overlapping another nested VM",
        create_raw(&Create {
            mem_gpa: block + NESTED_MEM,
            ..good
        }),
        errno::EBUSY,
    );
    let h = handles[1];

    // NESTED_VCPU
    let areas = alloc::boxed::Box::new(Areas::default());
    let areas_gpa = &raw const *areas as u64;
    check(
        "vcpu: destroyed handle",
        raw(nr::NESTED_VCPU, &[handles[0], 0, areas_gpa]),
        errno::EBADF,
    );
    check(
        "vcpu: made-up handle",
        raw(nr::NESTED_VCPU, &[0x1234_5678_9abc, 0, areas_gpa]),
        errno::ESTALE,
    );
    check(
        "vcpu: no such vCPU",
        raw(nr::NESTED_VCPU, &[h, 1, areas_gpa]),
        errno::EINVAL,
    );
    check(
        "vcpu: areas in the system area",
        raw(nr::NESTED_VCPU, &[h, 0, 0x1000]),
        errno::EFAULT,
    );
    check(
        "vcpu: areas outside memory",
        raw(nr::NESTED_VCPU, &[h, 0, mem_end - 64]),
        errno::EFAULT,
    );
    check(
        "vcpu: misaligned areas",
        raw(nr::NESTED_VCPU, &[h, 0, areas_gpa + 1]),
        errno::EFAULT,
    );
    check(
        "vcpu: areas inside the nested VM's memory",
        raw(nr::NESTED_VCPU, &[h, 0, block + NESTED_MEM + (4 << 20)]),
        errno::EINVAL,
    );

    // NESTED_RUN
    check(
        "run: vCPU not created",
        raw(nr::NESTED_RUN, &[h, 0, 0]),
        errno::EINVAL,
    );
    check(
        "run: no such vCPU",
        raw(nr::NESTED_RUN, &[h, 7, 0]),
        errno::EINVAL,
    );
    check(
        "run: destroyed handle",
        raw(nr::NESTED_RUN, &[handles[0], 0, 0]),
        errno::EBADF,
    );
    check(
        "run: made-up handle",
        raw(nr::NESTED_RUN, &[u64::MAX, 0, 0]),
        errno::ESTALE,
    );
    check("vcpu: good", raw(nr::NESTED_VCPU, &[h, 0, areas_gpa]), 0);
    // Counters the host keeps in our memory, set to their largest values: they wrap.
    let host = areas_gpa + core::mem::offset_of!(Areas, host) as u64;
    for word in 0..3 {
        // SAFETY: the host status area's runs, exits and guest_ns words, in our own box.
        unsafe { core::ptr::write_volatile((host as *mut u64).add(word), u64::MAX) };
    }
    // It runs after all that: "hello" prints and exits through hypercalls we answer with ENOSYS
    // (not emulated here); the first exit is enough.
    check(
        "run: good",
        // The longest slice there is (no overflow in the host).
        raw(nr::NESTED_RUN, &[h, 0, u64::MAX]),
        i64::from(exit::HYPERCALL),
    );

    // NESTED_START: vCPU 0 of `h` is created; `handles[2]` has none yet.
    check(
        "start: destroyed handle",
        raw(nr::NESTED_START, &[handles[0], 0]),
        errno::EBADF,
    );
    check(
        "start: made-up handle",
        raw(nr::NESTED_START, &[u64::MAX, 0]),
        errno::ESTALE,
    );
    check(
        "start: no such vCPU",
        raw(nr::NESTED_START, &[h, 7]),
        errno::EINVAL,
    );
    check(
        "start: vCPU not created",
        raw(nr::NESTED_START, &[handles[2], 0]),
        errno::EINVAL,
    );
    check("start: good", raw(nr::NESTED_START, &[h, 0]), 0);
    check("start: twice", raw(nr::NESTED_START, &[h, 0]), errno::EBUSY);
    check(
        "run: a started vCPU",
        raw(nr::NESTED_RUN, &[h, 0, 0]),
        errno::EBUSY,
    );
    check(
        "vcpu: a started vCPU",
        raw(nr::NESTED_VCPU, &[h, 0, areas_gpa]),
        errno::EBUSY,
    );
    // Doorbells nobody registered, of every width, and the right one while nothing is posted
    // back: ignored.
    for v in [0u32, 0xdead_beef, u32::MAX, ((h & 0xff) as u32) << 8] {
        // SAFETY: port writes the host ignores or takes as a wake-up; no memory is touched.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") abi::port::NESTED_DOORBELL, in("eax") v);
            core::arch::asm!("out dx, al", in("dx") abi::port::NESTED_DOORBELL, in("al") v as u8);
        }
    }
    // The started vCPU runs on its thread: its first posted exit arrives without a call.
    let t0 = time::monotonic_ns();
    // SAFETY: the host writes this word concurrently; read it atomically.
    let exit_seq = unsafe {
        core::sync::atomic::AtomicU64::from_ptr((&raw const areas.host.exit_seq).cast_mut())
    };
    while exit_seq.load(core::sync::atomic::Ordering::SeqCst) == 0
        && time::monotonic_ns() - t0 < 10_000_000_000
    {
        core::hint::spin_loop();
    }
    check(
        "start: an exit posted",
        exit_seq.load(core::sync::atomic::Ordering::SeqCst).min(1) as i64,
        1,
    );

    // NESTED_DESTROY (of `h` too, whose vCPU runs on its thread)
    for &x in &handles[1..] {
        check("destroy", raw(nr::NESTED_DESTROY, &[x]), 0);
    }
    check(
        "destroy: twice",
        raw(nr::NESTED_DESTROY, &[h]),
        errno::EBADF,
    );
    check(
        "destroy: made-up handle",
        raw(nr::NESTED_DESTROY, &[42]),
        errno::ESTALE,
    );
    // SAFETY: allocated above with `layout`; no nested VM uses it any more.
    unsafe { alloc::alloc::dealloc(block as *mut u8, layout) };
    drop(areas);
    let failures = failures.get();
    if failures == 0 {
        println!("nesthostile ok");
        0
    } else {
        println!("nesthostile: {failures} failures");
        1
    }
}

/// Hypercall round trips, direct and nested, interleaved so that both see the same load: the
/// nested guest (`hcbench N`) makes N `ABI_VERSION` calls; each is answered here, and between
/// two of them this guest makes one of its own. A nested round trip is timed from answering
/// one call to the next call's exit coming back (what the nested guest waits); `serve` is not
/// used, so that the direct calls sit outside the timed part.
fn bench(n: u64, posted: bool) -> i32 {
    let mut args = alloc::string::String::new();
    let _ = core::fmt::write(&mut args, format_args!("hcbench {n}"));
    let vm = match NestedVm::create(NESTED_MEM, 1, Image::Own, &args) {
        Ok(vm) => vm,
        Err(e) => {
            println!("nestbench: cannot create: {e}");
            return 1;
        }
    };
    let Ok(mut cpu) = vm.vcpu(0) else { return 1 };
    if posted && let Err(e) = cpu.start() {
        println!("nestbench: cannot start the vCPU: {e}");
        return 1;
    }
    let (mut direct_ns, mut direct) = (0u64, 0u64);
    let (mut nested_ns, mut nested) = (0u64, 0u64);
    let mut answer: Option<i64> = None;
    loop {
        let t0 = time::monotonic_ns();
        if let Some(ret) = answer.take() {
            cpu.answer(ret);
        }
        let reason = cpu.run();
        let t1 = time::monotonic_ns();
        let e = cpu.exit();
        match reason {
            Ok(exit::INTERRUPTED) => continue,
            Ok(exit::HYPERCALL) => {}
            other => {
                println!("nestbench: nested guest stopped: {other:?}");
                return 1;
            }
        }
        let ret = match e.nr as u32 {
            nr::ABI_VERSION => {
                nested_ns += t1 - t0;
                nested += 1;
                // One direct round trip between two nested ones.
                let t2 = time::monotonic_ns();
                raw(nr::ABI_VERSION, &[]);
                direct_ns += time::monotonic_ns() - t2;
                direct += 1;
                i64::from(abi::ABI_VERSION)
            }
            nr::CLOCK_MONOTONIC => time::monotonic_ns() as i64,
            nr::CONSOLE_WRITE => match vm.bytes(e.args[0], e.args[1]) {
                Some(b) => {
                    console(b);
                    e.args[1] as i64
                }
                None => errno::EFAULT,
            },
            nr::EXIT => break,
            _ => errno::ENOSYS,
        };
        answer = Some(ret);
    }
    let h = cpu.host_status();
    let (d, nn) = match posted {
        false => ("direct", "nested"),
        true => ("pdirect", "posted"),
    };
    println!("nestbench {d} {direct} {direct_ns}");
    println!(
        "nestbench {nn} {nested} {nested_ns} runs {} guest_ns {}",
        h.runs, h.guest_ns
    );
    0
}

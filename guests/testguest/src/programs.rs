//! Programs (ABI 1.10): the supervisor (this guest) loads an untrusted program's code into pages
//! of its own and runs two copies of it, each confined to its own code, data and stack by its
//! protection table. Checks that they cannot touch each other or the supervisor, that faults
//! come back as outcomes, and that a changed table applies at the next run.
//!
//! The program is position-independent machine code (`rb_prog_start..rb_prog_end`), driven by
//! its data page: word 0 the operation, word 1 its counter, word 2 an address, word 3 a result.

use alloc::alloc::{Layout, alloc_zeroed};
use core::ptr::{read_volatile, write_volatile};

use rebound_guest::abi::errno;
use rebound_guest::program::{Outcome, Program, Range, access};
use rebound_guest::{Cpu, println, time};

core::arch::global_asm!(
    ".pushsection .text.rbprog,\"ax\",@progbits",
    ".globl rb_prog_start",
    ".globl rb_prog_end",
    "rb_prog_start:",
    "mov rax, qword ptr [rdi]",
    "cmp rax, 1",
    "je 2f",
    "cmp rax, 2",
    "je 3f",
    "cmp rax, 3",
    "je 4f",
    "cmp rax, 4",
    "je 5f",
    "cmp rax, 5",
    "je 6f",
    "cmp rax, 6",
    "je 7f",
    "xor edx, edx",
    "jmp 9f",
    // 1: count a run and exit with the count.
    "2: add qword ptr [rdi + 8], 1",
    "mov rdx, qword ptr [rdi + 8]",
    "jmp 9f",
    // 2: read the word at word 2's address into word 3.
    "3: mov rax, qword ptr [rdi + 16]",
    "mov rax, qword ptr [rax]",
    "mov qword ptr [rdi + 24], rax",
    "xor edx, edx",
    "jmp 9f",
    // 3: write at word 2's address.
    "4: mov rax, qword ptr [rdi + 16]",
    "mov qword ptr [rax], 0xbad",
    "xor edx, edx",
    "jmp 9f",
    // 4: a hypercall programs may not make (BLOCK); its result into word 3.
    "5: mov rsi, qword ptr gs:[0]",
    "mov qword ptr [rsi + 16], 0",
    "mov eax, 4",
    "mov dx, 0x510",
    "out dx, eax",
    "mov rax, qword ptr [rsi + 64]",
    "mov qword ptr [rdi + 24], rax",
    "xor edx, edx",
    "jmp 9f",
    // 5: a privileged instruction.
    "6: xor eax, eax",
    "xor edx, edx",
    "mov ecx, 0x10",
    "wrmsr",
    "xor edx, edx",
    // 6: wait until word 2 is not 0 (the host sets it), then count a run and exit with the
    // count.
    "7: pause",
    "mov rcx, qword ptr [rdi + 16]",
    "test rcx, rcx",
    "jz 7b",
    "add qword ptr [rdi + 8], 1",
    "mov rdx, qword ptr [rdi + 8]",
    "jmp 9f",
    // PROGRAM_EXIT(rdx).
    "9: mov rsi, qword ptr gs:[0]",
    "mov qword ptr [rsi + 16], rdx",
    "mov eax, 24",
    "mov dx, 0x510",
    "out dx, eax",
    "ud2",
    "rb_prog_end:",
    ".popsection",
);

unsafe extern "C" {
    static rb_prog_start: u8;
    static rb_prog_end: u8;
}

/// A word the programs must never reach.
static SUPERVISOR_WORD: u64 = 0x5afe;

const PAGE: u64 = 4096;

pub fn run(mode: &str, cpu: &Cpu, arg: impl Fn(usize, u64) -> u64) -> Option<i32> {
    match mode {
        "progs" => Some(progs(cpu, arg(1, 1000))),
        "progbench" => Some(bench(arg(1, 10_000), arg(2, 60))),
        "proghostile" => Some(hostile(cpu.boot_info().heap_end)),
        "progspin" => Some(spin()),
        _ => None,
    }
}

fn pages(n: u64) -> u64 {
    let layout = Layout::from_size_align((n * PAGE) as usize, PAGE as usize).expect("layout");
    // SAFETY: a non-zero size; the memory is leaked on purpose (programs use it to the end).
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null(), "out of memory");
    p as u64
}

/// One loaded copy of the program: code, data and stack pages.
struct Loaded {
    code: u64,
    data: u64,
    stack: u64,
}

impl Loaded {
    fn new() -> Self {
        let code = pages(1);
        // Both symbols are in this image; the blob is shorter than a page.
        let (start, end) = (
            &raw const rb_prog_start as u64,
            &raw const rb_prog_end as u64,
        );
        let len = end - start;
        assert!(len < PAGE);
        // SAFETY: copying the blob's bytes into the fresh page.
        unsafe {
            core::ptr::copy_nonoverlapping(start as *const u8, code as *mut u8, len as usize)
        };
        Self {
            code,
            data: pages(1),
            stack: pages(1),
        }
    }

    fn table(&self) -> [Range; 3] {
        [
            Range {
                start: self.code,
                len: PAGE,
                access: access::READ | access::EXEC,
            },
            Range {
                start: self.data,
                len: PAGE,
                access: access::READ | access::WRITE,
            },
            Range {
                start: self.stack,
                len: PAGE,
                access: access::READ | access::WRITE,
            },
        ]
    }

    fn word(&self, i: u64) -> u64 {
        // SAFETY: inside the data page.
        unsafe { read_volatile((self.data + 8 * i) as *const u64) }
    }

    fn set_word(&self, i: u64, v: u64) {
        // SAFETY: inside the data page.
        unsafe { write_volatile((self.data + 8 * i) as *mut u64, v) }
    }

    fn op(&self, p: &Program, op: u64, addr: u64) -> Outcome {
        self.set_word(0, op);
        self.set_word(2, addr);
        p.run(self.code, self.stack + PAGE, self.data)
    }
}

/// Runs a fresh program once (operation 1: count and exit with the count); true if it
/// returned 1. For the emulation tests: a switch to a program and back.
pub fn run_once() -> bool {
    let a = Loaded::new();
    let Ok(p) = Program::set(2, &a.table()) else {
        return false;
    };
    matches!(a.op(&p, 1, 0), Outcome::Exited(1))
}

fn expect_fault(what: &str, o: Outcome, vector: u64) -> Option<rebound_guest::program::Fault> {
    match o {
        Outcome::Faulted(f) if f.vector == vector => {
            println!(
                "progs: {what}: faulted (vector {}, address {:#x})",
                f.vector, f.address
            );
            Some(f)
        }
        other => {
            println!("progs: {what}: expected a fault with vector {vector}, got {other:?}");
            None
        }
    }
}

fn progs(cpu: &Cpu, n: u64) -> i32 {
    let a = Loaded::new();
    let b = Loaded::new();
    let (Ok(pa), Ok(pb)) = (Program::set(0, &a.table()), Program::set(1, &b.table())) else {
        println!("progs: tables refused");
        return 1;
    };
    // Switch back and forth; each program's counter is its own.
    for i in 1..=n {
        for (l, p) in [(&a, &pa), (&b, &pb)] {
            if l.op(p, 1, 0) != Outcome::Exited(i) {
                println!("progs: run {i} ended wrong");
                return 1;
            }
        }
    }
    if a.word(1) != n || b.word(1) != n {
        println!("progs: counters {} {} after {n} runs", a.word(1), b.word(1));
        return 1;
    }
    println!("progs: {n} runs each, counters intact");

    let sup = &raw const SUPERVISOR_WORD as u64;
    let info = rebound_guest::abi::BOOT_INFO_ADDR;
    let vcpu_page = cpu.boot_info().vcpu_pages;
    let checks = [
        (
            "read the other program's data",
            a.op(&pa, 2, b.data),
            b.data,
        ),
        (
            "write the other program's data",
            a.op(&pa, 3, b.data + 8),
            b.data + 8,
        ),
        ("write the supervisor's memory", a.op(&pa, 3, sup), sup),
        (
            "read the supervisor's code",
            b.op(&pb, 2, a.code - PAGE),
            a.code - PAGE,
        ),
        ("read the boot info", a.op(&pa, 2, info), info),
        (
            "read the supervisor's vCPU page",
            a.op(&pa, 2, vcpu_page),
            vcpu_page,
        ),
    ];
    for (what, o, addr) in checks {
        match expect_fault(what, o, 14) {
            Some(f) if f.address == addr => {}
            _ => return 1,
        }
    }
    // SAFETY: reading this guest's own static.
    if unsafe { read_volatile(&raw const SUPERVISOR_WORD) } != 0x5afe || b.word(1) != n {
        println!("progs: a program changed memory it may not touch");
        return 1;
    }
    // Data is not executable.
    match pa.run(a.data, a.stack + PAGE, a.data) {
        Outcome::Faulted(f) if f.vector == 14 && f.error_code & 0x10 != 0 => {
            println!("progs: executing data: faulted")
        }
        other => {
            println!("progs: executing data: {other:?}");
            return 1;
        }
    }
    if expect_fault("privileged instruction", a.op(&pa, 5, 0), 13).is_none() {
        return 1;
    }
    if a.op(&pa, 4, 0) != Outcome::Exited(0) || a.word(3) as i64 != errno::EPERM {
        println!("progs: a forbidden hypercall returned {}", a.word(3) as i64);
        return 1;
    }
    println!("progs: forbidden hypercall refused");

    // A changed table takes effect on the next run, and changing it back too.
    let mut wider = [Range::default(); 4];
    wider[..3].copy_from_slice(&a.table());
    wider[3] = Range {
        start: b.data,
        len: PAGE,
        access: access::READ,
    };
    let _ = Program::set(0, &wider);
    if a.op(&pa, 2, b.data + 8) != Outcome::Exited(0) || a.word(3) != n {
        println!("progs: the widened table did not apply");
        return 1;
    }
    let _ = Program::set(0, &a.table());
    if expect_fault("read after narrowing", a.op(&pa, 2, b.data + 8), 14).is_none() {
        return 1;
    }
    // The programs still run, and so does the supervisor.
    if a.op(&pa, 1, 0) != Outcome::Exited(n + 1) {
        println!("progs: program 0 does not run after its faults");
        return 1;
    }
    println!("progs ok");
    0
}

/// A program that runs until the host writes a non-zero word 2 into its data page (for
/// snapshots taken while it runs).
fn spin() -> i32 {
    let a = Loaded::new();
    let Ok(p) = Program::set(0, &a.table()) else {
        return 1;
    };
    println!("progspin: running, data at {:#x}", a.data);
    match a.op(&p, 6, 0) {
        Outcome::Exited(1) if a.word(1) == 1 => {
            println!("progspin ok");
            0
        }
        other => {
            println!("progspin: {other:?}, counter {}", a.word(1));
            1
        }
    }
}

fn hostile(heap_end: u64) -> i32 {
    use rebound_guest::abi::nr;
    use rebound_guest::hypercall::raw;
    let a = Loaded::new();
    let t = a.table();
    let bad = |r: Range| {
        let rs = [r];
        raw(nr::PROGRAM_SET, &[0, rs.as_ptr() as u64, 1])
    };
    let results = [
        raw(nr::PROGRAM_SET, &[16, t.as_ptr() as u64, 3]),
        raw(nr::PROGRAM_SET, &[0, t.as_ptr() as u64, 17]),
        raw(nr::PROGRAM_SET, &[0, u64::MAX - 8, 3]),
        bad(Range {
            start: 0x1000,
            len: PAGE,
            access: access::READ,
        }),
        bad(Range {
            start: a.code + 1,
            len: PAGE,
            access: access::READ,
        }),
        bad(Range {
            start: a.code,
            len: 0,
            access: access::READ,
        }),
        bad(Range {
            start: a.code,
            len: u64::MAX - PAGE,
            access: access::READ,
        }),
        bad(Range {
            start: a.code,
            len: PAGE,
            access: access::WRITE,
        }),
        bad(Range {
            start: a.code,
            len: PAGE,
            access: 0x80 | access::READ,
        }),
        bad(Range {
            start: heap_end,
            len: PAGE,
            access: access::READ,
        }),
        raw(nr::PROGRAM_RUN, &[3, a.code, a.stack, 0, 0]),
        raw(nr::PROGRAM_RUN, &[99, a.code, a.stack, 0, 0]),
        raw(nr::PROGRAM_EXIT, &[5]),
    ];
    let _ = Program::set(0, &t);
    let results2 = [
        raw(nr::PROGRAM_RUN, &[0, a.code, a.stack, 0, 0x1000]),
        raw(nr::PROGRAM_RUN, &[0, a.code, a.stack, 0, u64::MAX - 4]),
    ];
    for (i, r) in results.iter().chain(results2.iter()).enumerate() {
        if *r >= 0 {
            println!("proghostile: call {i} was accepted ({r})");
            return 1;
        }
    }
    // After all that, a good run works.
    a.set_word(0, 1);
    if Program::set(0, &t).map(|p| p.run(a.code, a.stack + PAGE, a.data)) != Ok(Outcome::Exited(1))
    {
        println!("proghostile: a good run failed");
        return 1;
    }
    println!("proghostile ok");
    0
}

/// Switch costs, in one run: a bare hypercall; a run of a program whose page tables are
/// reused; a run right after its table changed (page tables built for it).
fn bench(n: u64, rebuilds: u64) -> i32 {
    let a = Loaded::new();
    let Ok(p) = Program::set(0, &a.table()) else {
        return 1;
    };
    a.set_word(0, 1);
    let _ = p.run(a.code, a.stack + PAGE, a.data);
    let t0 = time::monotonic_ns();
    for _ in 0..n {
        rebound_guest::hypercall::abi_version();
    }
    let floor = (time::monotonic_ns() - t0) / n;
    let t0 = time::monotonic_ns();
    for _ in 0..n {
        let _ = p.run(a.code, a.stack + PAGE, a.data);
    }
    let reused = (time::monotonic_ns() - t0) / n;
    if a.word(1) != n + 1 {
        println!("progbench: counter {} after {} runs", a.word(1), n + 1);
        return 1;
    }
    // Two tables that differ (one page more or less of stack): each set changes the table.
    let mut big = [Range::default(); 4];
    big[..3].copy_from_slice(&a.table());
    big[3] = Range {
        start: pages(1),
        len: PAGE,
        access: access::READ,
    };
    let t0 = time::monotonic_ns();
    let mut done = 0;
    for i in 0..rebuilds {
        let t = if i % 2 == 0 { &big[..] } else { &a.table()[..] };
        let _ = Program::set(0, t);
        match p.run(a.code, a.stack + PAGE, a.data) {
            Outcome::Exited(_) => done += 1,
            Outcome::Refused(e) => {
                println!("progbench: rebuild {i} refused: {e}");
                break;
            }
            Outcome::Faulted(f) => {
                println!("progbench: fault {f:?}");
                return 1;
            }
        }
    }
    let rebuilt = (time::monotonic_ns() - t0) / done.max(1);
    println!(
        "progbench n={n} floor_ns={floor} reused_ns={reused} rebuilt_ns={rebuilt} rebuilds={done}"
    );
    0
}

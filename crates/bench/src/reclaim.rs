//! Memory reclaim across VMs: the time to return 1 GiB and 4 GiB to the host from 8 VMs whose
//! guests answer the request (cache dropped, cold working data moved to swap, pages given
//! back), the time to give it back (regrow), and the work a busy guest loses meanwhile.
//!
//! Beside it: Firecracker's published figure for free page hinting (~200 ms per GiB, reporting
//! starting after ~2 s); a balloon cannot be driven here (no Linux guest boots on these hosts).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rebound_devices::console::SharedBuffer;
use rebound_memory::PAGES_PER_MIB;
use rebound_memory::part::MemoryPart;
use rebound_vmm::Vm;

use crate::{emit, testguest};

/// Firecracker's published free page hinting cost.
const FIRECRACKER_MS_PER_GIB: f64 = 200.0;

struct Held {
    vm: Arc<Vm>,
    out: SharedBuffer,
    part: MemoryPart,
}

fn launch(args: &str, mem_mib: u64) -> Result<Held> {
    let out = SharedBuffer::new();
    let vm = Arc::new(Vm::launch(
        &testguest(args, 1, mem_mib),
        Box::new(out.clone()),
    )?);
    Ok(Held {
        vm,
        out,
        part: MemoryPart::default(),
    })
}

fn wait_ready(h: &Held) -> Result<()> {
    let t0 = Instant::now();
    while !h.out.text().contains("memhold ready") {
        if t0.elapsed() > Duration::from_secs(120) || h.vm.outcome().is_some() {
            bail!("guest not ready: {}", h.out.text());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn finish(vms: &[Held]) -> Result<()> {
    for h in vms {
        h.vm.request_shutdown()?;
    }
    for h in vms {
        let o = h.vm.wait_timeout(Duration::from_secs(120));
        let text = h.out.text();
        if o != Some(rebound_vmm::VmOutcome::Exited { status: 0 }) || !text.contains(", 0 bad,") {
            bail!("a guest lost data or failed ({o:?}): {text}");
        }
    }
    Ok(())
}

const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The host's huge page setting for shared memory (the word in brackets).
fn shmem_thp() -> Option<String> {
    let t = std::fs::read_to_string(SHMEM_THP).ok()?;
    Some(t.split('[').nth(1)?.split(']').next()?.to_string())
}

/// Runs `f` with the host's shared-memory huge pages set to `mode` (root only), putting the
/// setting back after. Returns None if it cannot be set.
fn with_shmem_thp<T>(mode: &str, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    let Some(old) = shmem_thp() else {
        return Ok(None);
    };
    if old != mode && std::fs::write(SHMEM_THP, mode).is_err() {
        return Ok(None);
    }
    let r = f();
    if old != mode {
        let _ = std::fs::write(SHMEM_THP, &old);
    }
    r.map(Some)
}

/// [`reclaim`] with 4 KiB pages (the host's shmem_enabled = never) and with 2 MiB huge pages
/// (advise: guest memory asks for them), in one run.
pub fn across_vms(gib: u64) -> Result<()> {
    let small = with_shmem_thp("never", || reclaim(gib, "4k"))?;
    let huge = with_shmem_thp("advise", || reclaim(gib, "2m"))?;
    if small.is_none() && huge.is_none() {
        // Not root: the host's setting as it is.
        reclaim(gib, shmem_thp().as_deref().unwrap_or("unknown"))?;
    }
    Ok(())
}

/// `gib` GiB returned from 8 VMs: each gives `gib`/8 GiB, mostly cache, the rest working
/// data moved to swap.
fn reclaim(gib: u64, pages: &str) -> Result<()> {
    const N: u64 = 8;
    let each_mib = gib * 1024 / N;
    // Cache 7/8 of what each gives, working data the rest (plus what it keeps).
    let cache = each_mib * 7 / 8;
    let moved = each_mib - cache;
    let (working, swap) = (moved * 2, moved * 2);
    let mem = (cache + working + swap) * 5 / 4 + 32;
    let args = format!("memhold {working} {cache} {swap}");
    let vms: Vec<Held> = (0..N).map(|_| launch(&args, mem)).collect::<Result<_>>()?;
    for h in &vms {
        wait_ready(h)?;
    }
    let before: Vec<u64> = vms.iter().map(|h| h.vm.resident_pages()).collect();
    let t0 = Instant::now();
    for (h, b) in vms.iter().zip(&before) {
        h.part
            .set_target(&h.vm, b / PAGES_PER_MIB - each_mib, Some(5_000))?;
    }
    for h in &vms {
        if !h.part.wait_reached(&h.vm, Duration::from_secs(60)) {
            bail!(
                "a VM did not reach its target: {:?}",
                h.part.view(Some(&h.vm))
            );
        }
    }
    let reclaim = t0.elapsed().as_secs_f64() * 1e3;
    let returned: u64 = before
        .iter()
        .zip(&vms)
        .map(|(b, h)| b.saturating_sub(h.vm.resident_pages()))
        .sum();
    let unanswered: u64 = vms.iter().map(|h| h.part.view(None).stats.unanswered).sum();
    // Regrow: the targets go back up; the guests take back what they gave (and refill).
    let t1 = Instant::now();
    for (h, b) in vms.iter().zip(&before) {
        h.part.set_target(&h.vm, b / PAGES_PER_MIB + 16, None)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while vms.iter().any(|h| h.part.view(None).given_pages > 0) {
        if Instant::now() > deadline {
            bail!("the guests did not take their memory back");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let regrow_ack = t1.elapsed().as_secs_f64() * 1e3;
    // Back: the cache refilled and the working data home again (its swap slots given back,
    // so the VM holds `moved` MiB less than before).
    let want: u64 = (before.iter().sum::<u64>() - N * moved * PAGES_PER_MIB) * 95 / 100;
    while vms.iter().map(|h| h.vm.resident_pages()).sum::<u64>() < want {
        if Instant::now() > deadline {
            bail!("the guests did not refill");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let regrow = t1.elapsed().as_secs_f64() * 1e3;
    finish(&vms)?;
    let got_gib = returned as f64 / (PAGES_PER_MIB as f64 * 1024.0);
    emit(&format!("reclaim_{gib}gib_8vms_{pages}"), reclaim, "ms");
    emit(
        &format!("reclaim_{gib}gib_8vms_{pages}_ms_per_gib"),
        reclaim / got_gib,
        "ms",
    );
    emit(
        &format!("reclaim_{gib}gib_firecracker_free_page_hinting_published"),
        FIRECRACKER_MS_PER_GIB * gib as f64,
        "ms",
    );
    emit(
        &format!("regrow_{gib}gib_8vms_{pages}_taken_back"),
        regrow_ack,
        "ms",
    );
    emit(
        &format!("regrow_{gib}gib_8vms_{pages}_refilled"),
        regrow,
        "ms",
    );
    eprintln!(
        "reclaim {gib} GiB from 8 VMs, {pages} pages ({cache} MiB cache + {moved} MiB working to swap each): \
         {reclaim:.1} ms for {got_gib:.2} GiB ({:.1} ms/GiB; Firecracker free page hinting \
         published ~{FIRECRACKER_MS_PER_GIB:.0} ms/GiB); {unanswered} requests unanswered; \
         regrow: taken back in {regrow_ack:.1} ms, refilled to 95% in {regrow:.1} ms",
        reclaim / got_gib
    );
    Ok(())
}

/// Work units a busy guest reported, from its `memhold work N at T` lines: (units, ns).
fn progress(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("memhold work ")?;
            let (w, t) = rest.split_once(" at ")?;
            Some((w.parse().ok()?, t.trim().parse().ok()?))
        })
        .collect()
}

fn rate_between(p: &[(u64, u64)], from: u64, to: u64) -> f64 {
    let inside: Vec<_> = p.iter().filter(|(_, t)| *t >= from && *t <= to).collect();
    match (inside.first(), inside.last()) {
        (Some(a), Some(b)) if b.1 > a.1 => (b.0 - a.0) as f64 / ((b.1 - a.1) as f64 / 1e9),
        _ => 0.0,
    }
}

/// A busy guest's work rate while nothing happens, and while its memory is squeezed and
/// given back over and over (128 MiB of cache dropped and refilled, 16 MiB of working data
/// moved to swap and back).
pub fn work_lost() -> Result<()> {
    let h = launch("memhold 64 128 64 1 0 1", 320)?;
    wait_ready(&h)?;
    std::thread::sleep(Duration::from_millis(300));
    let quiet_from = progress(&h.out.text()).last().map_or(0, |p| p.1);
    std::thread::sleep(Duration::from_millis(1500));
    let quiet_to = progress(&h.out.text()).last().map_or(0, |p| p.1);
    let base = h.vm.resident_pages() / PAGES_PER_MIB;
    let busy_from = quiet_to;
    let t0 = Instant::now();
    let mut cycles = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        h.part.set_target(&h.vm, base - 144, Some(1_000))?;
        h.part.wait_reached(&h.vm, Duration::from_secs(30));
        h.part.set_target(&h.vm, base + 16, None)?;
        // Back, and refilled (less the swap slots the working data left).
        let d = Instant::now() + Duration::from_secs(30);
        while (h.part.view(None).given_pages > 0
            || h.vm.resident_pages() < (base - 24) * PAGES_PER_MIB)
            && Instant::now() < d
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        cycles += 1;
    }
    std::thread::sleep(Duration::from_millis(150));
    let busy_to = progress(&h.out.text()).last().map_or(0, |p| p.1);
    let p = progress(&h.out.text());
    let quiet = rate_between(&p, quiet_from, quiet_to);
    let squeezed = rate_between(&p, busy_from, busy_to);
    finish(std::slice::from_ref(&h))?;
    let lost = if quiet > 0.0 {
        (1.0 - squeezed / quiet) * 100.0
    } else {
        0.0
    };
    emit("reclaim_guest_work_rate_quiet", quiet, "units/s");
    emit("reclaim_guest_work_rate_squeezed", squeezed, "units/s");
    emit("reclaim_guest_work_lost", lost, "%");
    eprintln!(
        "work lost: a busy guest did {quiet:.0} units/s quiet, {squeezed:.0} units/s through \
         {cycles} squeeze/regrow cycles of 144 MiB ({lost:.1}% lost)"
    );
    Ok(())
}

//! How a host memory budget is spread across VMs (pure logic, unit-tested).
//!
//! Reclaim comes first from cache (contents the guests can rebuild), in proportion to each
//! VM's cache; what cache cannot cover comes from the rest of each VM's memory above its
//! minimum, in proportion to that; no VM goes below its minimum. Memory returns, when the
//! budget allows, in proportion to what each VM gave up.

use serde::Serialize;

/// One VM as the policy sees it (pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmUse {
    /// Host memory it holds now.
    pub resident: u64,
    /// Its cache class.
    pub cache: u64,
    /// Never take it below this.
    pub min: u64,
    /// What it gave up so far and may take back.
    pub given: u64,
}

/// What the policy decided for one VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Its target (pages).
    pub target: u64,
    /// Pages to reclaim (> 0) or give back (< 0).
    pub delta: i64,
}

/// Splits `amount` across `weights` in proportion, each part at most its `cap`; what a capped
/// part cannot take goes to the others. Returns the parts (their sum is `min(amount, Σ caps)`).
pub fn share(amount: u64, weights: &[u64], caps: &[u64]) -> Vec<u64> {
    let n = weights.len();
    let mut out = vec![0u64; n];
    let mut left = amount.min(caps.iter().sum());
    // Each round either places everything or fills at least one part to its cap.
    for _ in 0..=n {
        if left == 0 {
            break;
        }
        let open: Vec<usize> = (0..n).filter(|&i| out[i] < caps[i]).collect();
        let wsum: u128 = open.iter().map(|&i| u128::from(weights[i].max(1))).sum();
        if open.is_empty() || wsum == 0 {
            break;
        }
        let mut placed = 0;
        for &i in &open {
            let want = (u128::from(left) * u128::from(weights[i].max(1))).div_ceil(wsum) as u64;
            let give = want.min(caps[i] - out[i]).min(left - placed);
            out[i] += give;
            placed += give;
        }
        left -= placed;
    }
    out
}

/// The targets that bring the VMs' total within `budget` pages (or let them grow back
/// toward what they gave up, when there is room).
pub fn spread(vms: &[VmUse], budget: u64) -> Vec<Plan> {
    let total: u64 = vms.iter().map(|v| v.resident).sum();
    let keep = |v: &VmUse| Plan {
        target: v.resident,
        delta: 0,
    };
    if total > budget {
        let need = total - budget;
        let room: Vec<u64> = vms
            .iter()
            .map(|v| v.resident.saturating_sub(v.min))
            .collect();
        let cache_caps: Vec<u64> = vms
            .iter()
            .zip(&room)
            .map(|(v, r)| v.cache.min(*r))
            .collect();
        let from_cache = share(need, &cache_caps, &cache_caps);
        let rest: u64 = need - from_cache.iter().sum::<u64>();
        let rest_caps: Vec<u64> = room.iter().zip(&from_cache).map(|(r, c)| r - c).collect();
        let from_rest = share(rest, &rest_caps, &rest_caps);
        vms.iter()
            .enumerate()
            .map(|(i, v)| {
                let take = from_cache[i] + from_rest[i];
                Plan {
                    target: v.resident - take,
                    delta: take as i64,
                }
            })
            .collect()
    } else {
        let given: Vec<u64> = vms.iter().map(|v| v.given).collect();
        let back = share(budget - total, &given, &given);
        vms.iter()
            .zip(back)
            .map(|(v, b)| {
                if b == 0 {
                    keep(v)
                } else {
                    Plan {
                        target: v.resident + b,
                        delta: -(b as i64),
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(resident: u64, cache: u64, min: u64, given: u64) -> VmUse {
        VmUse {
            resident,
            cache,
            min,
            given,
        }
    }

    #[test]
    fn share_is_proportional_and_respects_caps() {
        assert_eq!(share(100, &[1, 1], &[1000, 1000]), vec![50, 50]);
        assert_eq!(share(90, &[1, 2], &[1000, 1000]), vec![30, 60]);
        // A capped part passes the rest on.
        assert_eq!(share(100, &[1, 1], &[10, 1000]), vec![10, 90]);
        // Never more than the caps allow.
        assert_eq!(share(100, &[1, 1], &[10, 20]), vec![10, 20]);
        assert_eq!(share(0, &[1, 1], &[10, 20]), vec![0, 0]);
        assert_eq!(share(7, &[], &[]), Vec::<u64>::new());
    }

    #[test]
    fn reclaim_takes_cache_first_in_proportion() {
        let plans = spread(&[vm(1000, 300, 100, 0), vm(1000, 100, 100, 0)], 1800);
        assert_eq!(plans[0].delta + plans[1].delta, 200);
        assert_eq!(plans[0].delta, 150);
        assert_eq!(plans[1].delta, 50);
        assert_eq!(plans[0].target, 850);
    }

    #[test]
    fn past_the_cache_the_rest_is_taken_above_each_minimum() {
        let plans = spread(&[vm(1000, 100, 900, 0), vm(1000, 0, 200, 0)], 1200);
        // 800 needed: the 100 of cache, then 700 from the only VM with room above its minimum.
        assert_eq!(plans[0].target, 900, "{plans:?}");
        assert_eq!(plans[1].target, 300, "{plans:?}");
    }

    #[test]
    fn no_vm_goes_below_its_minimum_even_if_the_budget_cannot_be_met() {
        let plans = spread(&[vm(500, 50, 400, 0), vm(500, 50, 450, 0)], 100);
        assert_eq!(plans[0].target, 400);
        assert_eq!(plans[1].target, 450);
    }

    #[test]
    fn room_goes_back_in_proportion_to_what_was_given() {
        let plans = spread(
            &[vm(500, 0, 0, 300), vm(500, 0, 0, 100), vm(500, 0, 0, 0)],
            1700,
        );
        assert_eq!(plans[0].delta, -150);
        assert_eq!(plans[1].delta, -50);
        assert_eq!(plans[2].delta, 0);
        // Never more than was given.
        let plans = spread(&[vm(500, 0, 0, 30)], 10_000);
        assert_eq!(plans[0].delta, -30);
    }
}

//! A set of guest pages, as a bitmap (KVM's dirty log format: bit `i` of word `i / 64` is page
//! `i`).

use serde::{Deserialize, Serialize};

/// Pages of guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtySet {
    pages: u64,
    words: Vec<u64>,
}

impl DirtySet {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Every page.
    pub fn full(pages: u64) -> Self {
        let mut s = Self::new(pages);
        for p in 0..pages {
            s.insert(p);
        }
        s
    }

    /// A set from a bitmap (e.g. from `KVM_GET_DIRTY_LOG`); bits past `pages` are ignored.
    pub fn from_words(pages: u64, mut words: Vec<u64>) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        let mut s = Self { pages, words };
        s.clear_tail();
        s
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// Number of pages the set ranges over.
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    /// Adds page `p` (ignored if out of range).
    pub fn insert(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Removes page `p` (ignored if out of range).
    pub fn remove(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] &= !(1 << (p % 64));
        }
    }

    /// Whether page `p` is in the set.
    pub fn contains(&self, p: u64) -> bool {
        p < self.pages && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Adds every page of `other` (the sets must range over the same pages; extra bits of a
    /// larger `other` are ignored).
    pub fn union_words(&mut self, other: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= o;
        }
        self.clear_tail();
    }

    /// Adds every page of `other`.
    pub fn union(&mut self, other: &DirtySet) {
        self.union_words(&other.words);
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// The pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter_from(0)
    }

    /// The pages from `first` on, in ascending order (without walking the ones before).
    pub fn iter_from(&self, first: u64) -> impl Iterator<Item = u64> + '_ {
        let start = (first / 64) as usize;
        let skip = first % 64;
        self.words
            .iter()
            .enumerate()
            .skip(start)
            .flat_map(move |(i, &w)| {
                let mut w = if i == start && skip > 0 {
                    w & !((1u64 << skip) - 1)
                } else {
                    w
                };
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let bit = w.trailing_zeros();
                    w &= w - 1;
                    Some(i as u64 * 64 + u64::from(bit))
                })
            })
    }

    /// Maximal runs of consecutive pages, each at most `max` long: `(first, count)`.
    pub fn runs(&self, max: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in self.iter() {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p && *count < max => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }
}

/// Which written pages to leave writable across checkpoints. Re-protecting a page so its next
/// write is seen costs the guest a fault at that write (~15-20 µs for KVM's dirty log through
/// PVM's shadow paging, 70-145 µs for a userfaultfd write-protect fault); treating a page as
/// written at the next checkpoints instead costs a copy of it each time (well under a
/// microsecond). A page written stays writable for [`HotPages::HARVESTS`] checkpoints, at most
/// [`HotPages::BUDGET`] pages at once, so a guest that writes the same pages every epoch (socket
/// buffers, connection state) faults once per that many checkpoints, while one that writes
/// much memory once gets the usual protection for what does not fit.
#[derive(Clone, Debug)]
pub struct HotPages {
    /// Per page: checkpoints left before it is protected again (0: protected).
    left: Vec<u8>,
    /// Pages with a non-zero count.
    count: usize,
}

impl HotPages {
    /// Checkpoints a written page stays writable.
    pub const HARVESTS: u8 = 32;
    /// Most pages writable at once (2 MiB).
    pub const BUDGET: usize = 512;

    /// For `pages` pages, all protected.
    pub fn new(pages: u64) -> Self {
        Self {
            left: vec![0; pages as usize],
            count: 0,
        }
    }

    /// Page `p` was reported written at this checkpoint (every page left writable is): whether
    /// to leave it writable until the next one (false: protect it again now).
    pub fn keep(&mut self, p: u64) -> bool {
        let Some(left) = self.left.get_mut(p as usize) else {
            return false;
        };
        if *left == 0 {
            if self.count >= Self::BUDGET {
                return false;
            }
            *left = Self::HARVESTS - 1;
            self.count += 1;
            return true;
        }
        *left -= 1;
        if *left == 0 {
            self.count -= 1;
        }
        *left > 0
    }

    /// Every page is protected again (a rollback or restart re-protected them).
    pub fn reset(&mut self) {
        self.left.fill(0);
        self.count = 0;
    }

    /// Pages writable now.
    pub fn writable(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn iter_from_yields_exactly_the_pages_from_there_on(
            pages in proptest::collection::btree_set(0u64..300, 0..60),
            first in 0u64..320,
        ) {
            let mut d = DirtySet::new(300);
            for &p in &pages {
                d.insert(p);
            }
            let want: Vec<u64> = pages.iter().copied().filter(|&p| p >= first).collect();
            prop_assert_eq!(d.iter_from(first).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn a_page_written_every_checkpoint_is_protected_once_per_harvests() {
        let mut h = HotPages::new(4);
        let protected = (0..3 * u32::from(HotPages::HARVESTS))
            .filter(|_| !h.keep(1))
            .count();
        assert_eq!(protected, 3);
        assert!(!h.keep(99), "pages past the end are never kept");
    }

    #[test]
    fn past_the_budget_pages_are_protected_at_once() {
        let n = HotPages::BUDGET as u64 + 10;
        let mut h = HotPages::new(n);
        let kept = (0..n).filter(|&p| h.keep(p)).count();
        assert_eq!(kept, HotPages::BUDGET);
        assert_eq!(h.writable(), HotPages::BUDGET);
        h.reset();
        assert_eq!(h.writable(), 0);
        assert!(h.keep(n - 1));
    }

    #[test]
    fn words_and_tail() {
        let s = DirtySet::from_words(70, vec![0b1011, u64::MAX]);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![0, 1, 3, 64, 65, 66, 67, 68, 69]
        );
        assert_eq!(s.count(), 9);
        assert!(!s.contains(70));
        assert_eq!(s.runs(4), vec![(0, 2), (3, 1), (64, 4), (68, 2)]);
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set(pages in proptest::collection::btree_set(0u64..500, 0..200), max in 1u64..20) {
            let mut s = DirtySet::new(500);
            for &p in &pages { s.insert(p); }
            let mut back = Vec::new();
            for (first, count) in s.runs(max) {
                prop_assert!(count >= 1 && count <= max);
                back.extend(first..first + count);
            }
            prop_assert_eq!(back, pages.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(s.count(), pages.len() as u64);
        }
    }
}

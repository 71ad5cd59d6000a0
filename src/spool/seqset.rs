//! A set of sequence numbers kept as runs (`start..end`): the acknowledged batches above
//! the log's base come in runs (the live batches acknowledged while the backlog drains), so
//! the set's memory follows the number of gaps, not the number of batches.

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqSet {
    /// start → end (exclusive); runs neither overlap nor touch.
    runs: BTreeMap<u64, u64>,
    len: u64,
}

impl SeqSet {
    pub fn new() -> SeqSet {
        SeqSet::default()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many runs (the set's memory).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.runs
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| seq < end)
    }

    /// Adds `seq`; false if it was there.
    pub fn insert(&mut self, seq: u64) -> bool {
        if seq == u64::MAX || self.contains(seq) {
            return false;
        }
        let (mut start, mut end) = (seq, seq + 1);
        if let Some((&s, &e)) = self.runs.range(..seq).next_back()
            && e == seq
        {
            start = s;
        }
        if let Some(e) = self.runs.remove(&end) {
            end = e;
        }
        self.runs.insert(start, end);
        self.len += 1;
        true
    }

    /// Drops every seq below `w`.
    pub fn retain_from(&mut self, w: u64) {
        let straddle = self
            .runs
            .range(..w)
            .next_back()
            .and_then(|(_, &e)| (e > w).then_some(e));
        let mut upper = self.runs.split_off(&w);
        if let Some(e) = straddle {
            upper.insert(w, e);
        }
        self.runs = upper;
        self.len = self.runs.iter().map(|(s, e)| e - s).sum();
    }

    /// How many seqs in `[a, b)`.
    pub fn count_in(&self, a: u64, b: u64) -> u64 {
        if a >= b {
            return 0;
        }
        let mut n = 0;
        if let Some((_, &e)) = self.runs.range(..=a).next_back()
            && e > a
        {
            n += e.min(b) - a;
        }
        for (&s, &e) in self.runs.range(a.saturating_add(1)..b) {
            n += e.min(b) - s;
        }
        n
    }

    pub fn last(&self) -> Option<u64> {
        self.runs.iter().next_back().map(|(_, &e)| e - 1)
    }

    /// The seqs from `a` on, in order.
    pub fn iter_from(&self, a: u64) -> impl Iterator<Item = u64> + '_ {
        let first = self
            .runs
            .range(..=a)
            .next_back()
            .filter(|(_, e)| **e > a)
            .map(|(_, &e)| a..e);
        first.into_iter().flatten().chain(
            self.runs
                .range(a.saturating_add(1)..)
                .flat_map(|(&s, &e)| s..e),
        )
    }
}

impl FromIterator<u64> for SeqSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> SeqSet {
        let mut s = SeqSet::new();
        for seq in iter {
            s.insert(seq);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn behaves_as_a_set_of_numbers() {
        // Against a BTreeSet, with a fixed pseudo-random sequence of operations.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut set = SeqSet::new();
        let mut model = BTreeSet::new();
        for _ in 0..5000 {
            let seq = next() % 300;
            match next() % 10 {
                0 => {
                    let w = next() % 300;
                    set.retain_from(w);
                    model = model.split_off(&w);
                }
                _ => assert_eq!(set.insert(seq), model.insert(seq)),
            }
            assert_eq!(set.len(), model.len() as u64);
            let (a, b) = (next() % 320, next() % 320);
            assert_eq!(set.count_in(a, b), model.range(a..b.max(a)).count() as u64);
            assert_eq!(set.contains(seq), model.contains(&seq));
            assert_eq!(set.last(), model.iter().next_back().copied());
            let from = next() % 320;
            assert!(set.iter_from(from).eq(model.range(from..).copied()));
        }
    }

    #[test]
    fn a_run_is_one_entry() {
        let s: SeqSet = (1000..500_000).collect();
        assert_eq!(s.runs(), 1);
        assert_eq!(s.len(), 499_000);
    }
}

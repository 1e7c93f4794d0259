//! Sets of byte ranges of a blob (`start..end`, merged): the bytes written
//! so far ([`super::ingest`]), and the bytes written or being fetched
//! (`mirror::pieces`).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Merged, non-touching byte ranges: start → end (exclusive).
#[derive(Default, Debug, Clone)]
pub struct Spans {
    ranges: BTreeMap<u64, u64>,
}

impl Spans {
    /// Adds `start..end`.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Takes `start..end` out.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut cut = Vec::new();
        if let Some((&s, &e)) = self.ranges.range(..start).next_back() {
            if e > start {
                cut.push((s, e));
            }
        }
        cut.extend(self.ranges.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in cut {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start);
            }
            if e > end {
                self.ranges.insert(end, e);
            }
        }
    }

    /// Where the run of covered bytes that holds `pos` ends; `pos` when
    /// `pos` is not covered.
    pub fn run_end(&self, pos: u64) -> u64 {
        match self.ranges.range(..=pos).next_back() {
            Some((_, &e)) if e > pos => e,
            _ => pos,
        }
    }

    /// How long the covered start of the blob is.
    pub fn prefix(&self) -> u64 {
        self.ranges.get(&0).copied().unwrap_or(0)
    }

    /// The first uncovered range at or after `from` and before `limit`.
    pub fn gap(&self, from: u64, limit: u64) -> Option<(u64, u64)> {
        let start = self.run_end(from);
        if start >= limit {
            return None;
        }
        let end = self
            .ranges
            .range(start..)
            .next()
            .map_or(limit, |(&s, _)| s.min(limit));
        Some((start, end))
    }

    /// Bytes covered in all.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// The bytes of a blob in flight that are in its file, for its readers:
/// a read may go on up to the end of the written run it is in.
#[derive(Default, Clone)]
pub struct Present(Arc<Mutex<Spans>>);

impl Present {
    pub fn add(&self, start: u64, end: u64) {
        self.0.lock().insert(start, end);
    }

    /// Where the written bytes from `pos` on end (`pos`: none there yet).
    pub fn run_end(&self, pos: u64) -> u64 {
        self.0.lock().run_end(pos)
    }
}

impl std::fmt::Debug for Present {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Present({:?})", self.0.lock().ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_split() {
        let mut s = Spans::default();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.prefix(), 0);
        s.insert(0, 5);
        s.insert(5, 10);
        assert_eq!((s.prefix(), s.ranges.len()), (20, 2));
        s.insert(20, 30);
        assert_eq!((s.prefix(), s.ranges.len()), (40, 1));
        assert_eq!(s.run_end(7), 40);
        assert_eq!(s.run_end(40), 40);
        s.remove(15, 25);
        assert_eq!((s.prefix(), s.ranges.len(), s.len()), (15, 2, 30));
        assert_eq!(s.gap(0, 100), Some((15, 25)));
        assert_eq!(s.gap(26, 100), Some((40, 100)));
        assert_eq!(s.gap(26, 40), None);
        s.remove(0, 100);
        assert!(s.ranges.is_empty());
        assert_eq!(s.gap(3, 9), Some((3, 9)));
    }
}

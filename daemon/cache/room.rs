//! Room in the cache: how many bytes it holds (blobs, manifests and tags)
//! and how many the downloads under way have reserved.
//!
//! A download reserves its bytes before it writes them: the size its
//! upstream announced, at once, or, when none was announced, as they
//! arrive. A reservation is granted only when it fits as things are: the
//! blob at most `max_blob_size`, everything stored and reserved within
//! `max_size`, and `min_free` left free on the filesystem. Nothing is
//! evicted to make room for it: a size an upstream claims can never push
//! committed content out. A download that gets no room fails (its client
//! gets a quick 503 and goes to the registry itself), and the collector is
//! asked to run now, so that the next ones fit: it keeps a tenth of the
//! cache's room free for new downloads (`gc`).

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::gc::free_bytes;
use super::Store;

/// The limits reservations are held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_size: Option<u64>,
    pub min_free: u64,
    pub max_blob_size: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_size: None,
            min_free: 0,
            max_blob_size: u64::MAX,
        }
    }
}

/// The cache's bytes, and the downloads' reservations.
#[derive(Default)]
pub struct Room {
    counts: Mutex<Counts>,
    /// Told when a reservation was refused: the collector runs now.
    wanted: Notify,
}

#[derive(Default)]
struct Counts {
    stored: u64,
    /// `stored` is a count of what is there (the start-up count is done),
    /// kept as files come and go; not yet: only what came in since start.
    counted: bool,
    reserved: u64,
    budget: Budget,
}

/// Why a download gets no room.
#[derive(Debug, thiserror::Error)]
pub enum NoRoom {
    #[error("a blob of {size} bytes is over max_blob_size ({max} bytes)")]
    TooBig { size: u64, max: u64 },
    #[error("no room in the cache for {want} more bytes: {why}")]
    Full { want: u64, why: String },
}

/// Bytes a download may write. Dropped, they are given back.
pub struct Reservation {
    store: Arc<Store>,
    bytes: u64,
}

/// Growth of a reservation for a body of unknown size, at least this much
/// at a time (each grant reads the filesystem's free space).
const GROWTH: u64 = 8 << 20;

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Makes sure `to` bytes are reserved, growing by at least
    /// [`GROWTH`] when it must (blocking: reads the free space).
    pub fn grow(&mut self, to: u64) -> Result<(), NoRoom> {
        if to <= self.bytes {
            return Ok(());
        }
        let room = &self.store.room;
        let max_blob = room.counts.lock().budget.max_blob_size;
        if to > max_blob {
            return Err(NoRoom::TooBig {
                size: to,
                max: max_blob,
            });
        }
        let more = (to - self.bytes).max(GROWTH).min(max_blob - self.bytes);
        self.store.grant(more)?;
        self.bytes += more;
        Ok(())
    }

    /// The download is stored, `len` bytes of it: they count as stored
    /// now, and what was reserved beyond goes back.
    pub fn commit(mut self, len: u64) {
        let mut c = self.store.room.counts.lock();
        c.reserved = c.reserved.saturating_sub(self.bytes);
        c.stored = c.stored.saturating_add(len);
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut c = self.store.room.counts.lock();
        c.reserved = c.reserved.saturating_sub(self.bytes);
    }
}

impl Store {
    /// The limits in force (from the settings; a reload changes them).
    pub fn set_budget(&self, budget: Budget) {
        self.room.counts.lock().budget = budget;
    }

    /// Reserves `bytes` for a download announced at that size (0: none
    /// announced; it grows as bytes arrive). Blocking: reads the free
    /// space.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, NoRoom> {
        let max_blob = self.room.counts.lock().budget.max_blob_size;
        if bytes > max_blob {
            return Err(NoRoom::TooBig {
                size: bytes,
                max: max_blob,
            });
        }
        if bytes > 0 {
            self.grant(bytes)?;
        }
        Ok(Reservation {
            store: self.clone(),
            bytes,
        })
    }

    /// Counts `more` bytes as reserved if they fit under the budget
    /// without evicting anything.
    fn grant(&self, more: u64) -> Result<(), NoRoom> {
        let free = free_bytes(&self.root).ok();
        let mut c = self.room.counts.lock();
        let refused = |why: String| NoRoom::Full { want: more, why };
        let after = c.stored.saturating_add(c.reserved).saturating_add(more);
        let over_size = c.budget.max_size.filter(|&m| after > m);
        let short = free.filter(|&f| f.saturating_sub(more) < c.budget.min_free);
        let refusal = match (over_size, short) {
            (Some(m), _) => Some(refused(format!(
                "{} bytes stored and {} reserved; max_size is {m}",
                c.stored, c.reserved
            ))),
            (_, Some(f)) => Some(refused(format!(
                "{f} bytes free on the cache's filesystem; min_free is {}",
                c.budget.min_free
            ))),
            _ => None,
        };
        if let Some(r) = refusal {
            drop(c);
            self.room.wanted.notify_one();
            return Err(r);
        }
        c.reserved += more;
        Ok(())
    }

    /// Bytes the cache holds (from the last scan, and the changes since).
    pub fn stored_bytes(&self) -> u64 {
        self.room.counts.lock().stored
    }

    /// Bytes reserved by downloads under way.
    pub fn reserved_bytes(&self) -> u64 {
        self.room.counts.lock().reserved
    }

    /// Sets the bytes held, as a scan found them.
    pub fn set_stored(&self, bytes: u64) {
        self.room.counts.lock().stored = bytes;
    }

    /// Sets the bytes held, as a walk over the cache counted them: from
    /// now on the running total stands for the cache.
    pub fn set_counted(&self, bytes: u64) {
        let mut c = self.room.counts.lock();
        c.stored = bytes;
        c.counted = true;
    }

    /// Whether the running total stands for the cache ([`Self::set_counted`]).
    pub fn counted(&self) -> bool {
        self.room.counts.lock().counted
    }

    /// A file of `added` bytes came in, or one of `removed` bytes went.
    pub(crate) fn stored_changed(&self, added: u64, removed: u64) {
        let mut c = self.room.counts.lock();
        c.stored = c.stored.saturating_add(added).saturating_sub(removed);
    }

    /// Resolves when a download was refused room (the collector then
    /// makes some for the next ones).
    pub async fn room_wanted(&self) {
        self.room.wanted.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_or_fail_and_never_outlive_their_download() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.set_budget(Budget {
            max_size: Some(100 << 20),
            min_free: 0,
            max_blob_size: 64 << 20,
        });
        store.set_stored(30 << 20);
        // Over max_blob_size.
        assert!(matches!(
            store.reserve(65 << 20),
            Err(NoRoom::TooBig { .. })
        ));
        // Fits: 30 + 60 <= 100.
        let a = store.reserve(60 << 20).unwrap();
        assert_eq!(store.reserved_bytes(), 60 << 20);
        // Would need eviction: 30 + 60 + 20 > 100.
        assert!(matches!(store.reserve(20 << 20), Err(NoRoom::Full { .. })));
        a.commit(60 << 20);
        assert_eq!(
            (store.stored_bytes(), store.reserved_bytes()),
            (90 << 20, 0)
        );
        // A body of unknown size grows in steps, and fails at the limit.
        let mut b = store.reserve(0).unwrap();
        b.grow(1).unwrap();
        assert_eq!(b.bytes(), GROWTH);
        assert!(b.grow(11 << 20).is_err(), "90 + 11 > 100");
        drop(b);
        assert_eq!(store.reserved_bytes(), 0, "given back");
        // min_free: a floor nothing may go below.
        store.set_budget(Budget {
            max_size: None,
            min_free: u64::MAX,
            max_blob_size: u64::MAX,
        });
        assert!(matches!(store.reserve(1), Err(NoRoom::Full { .. })));
    }
}

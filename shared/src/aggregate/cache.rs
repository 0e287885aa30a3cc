//! States a repository loaded or produced, kept between commands (in a Lambda, between
//! invocations of a warm instance). Events are immutable, so a state at version `v` stays the
//! true state at `v`: a later load reads only the events after `v`, one Query, and no snapshot.
//! A hot stream (one SKU's inventory, which every order reserves and commits) costs one request
//! less per load, and a smaller read.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

use super::Aggregate;

struct Entry {
    state: Box<dyn Any + Send + Sync>,
    version: u64,
    used: u64,
}

/// At most `capacity` streams, the least recently used one evicted first.
pub(super) struct StateCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    clock: u64,
}

impl StateCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self { capacity, inner: Mutex::new(Inner::default()) }
    }

    /// A copy of the cached state of `stream` and its version.
    pub(super) fn get<A: Aggregate>(&self, stream: &str) -> Option<(A, u64)> {
        let mut inner = self.inner.lock().ok()?;
        inner.clock += 1;
        let clock = inner.clock;
        let entry = inner.entries.get_mut(stream)?;
        entry.used = clock;
        let state = entry.state.downcast_ref::<A>()?.clone();
        Some((state, entry.version))
    }

    /// Keeps `state` at `version`, unless a newer version of the stream is already kept (two
    /// commands of one instance may finish out of order).
    pub(super) fn put<A: Aggregate>(&self, stream: &str, state: &A, version: u64) {
        let Ok(mut inner) = self.inner.lock() else { return };
        inner.clock += 1;
        let clock = inner.clock;
        if let Some(entry) = inner.entries.get_mut(stream) {
            if entry.version <= version {
                *entry = Entry { state: Box::new(state.clone()), version, used: clock };
            }
            return;
        }
        if inner.entries.len() >= self.capacity {
            let oldest = inner.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(stream.to_owned(), Entry { state: Box::new(state.clone()), version, used: clock });
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::Inventory;

    fn stock(available: u64) -> Inventory {
        Inventory { available, ..Inventory::default() }
    }

    #[test]
    fn the_least_recently_used_stream_is_evicted_first() {
        // Given a cache of two streams, the first one used since the second was put
        let cache = StateCache::new(2);
        cache.put("Inventory-a", &stock(1), 1);
        cache.put("Inventory-b", &stock(2), 1);
        assert!(cache.get::<Inventory>("Inventory-a").is_some());

        // When a third stream is put
        cache.put("Inventory-c", &stock(3), 1);

        // Then the least recently used one (b) made room
        assert_eq!(cache.len(), 2);
        assert!(cache.get::<Inventory>("Inventory-b").is_none());
        assert_eq!(cache.get::<Inventory>("Inventory-a"), Some((stock(1), 1)));
        assert_eq!(cache.get::<Inventory>("Inventory-c"), Some((stock(3), 1)));
    }

    #[test]
    fn an_older_version_never_replaces_a_newer_one() {
        // Given a stream kept at version 5
        let cache = StateCache::new(4);
        cache.put("Inventory-a", &stock(5), 5);

        // When a command that finished later but read earlier puts version 3
        cache.put("Inventory-a", &stock(3), 3);

        // Then version 5 is kept; a newer version replaces it
        assert_eq!(cache.get::<Inventory>("Inventory-a"), Some((stock(5), 5)));
        cache.put("Inventory-a", &stock(6), 6);
        assert_eq!(cache.get::<Inventory>("Inventory-a"), Some((stock(6), 6)));
    }
}

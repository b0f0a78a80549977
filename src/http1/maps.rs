//! Header maps kept for the next head: each thread keeps the last few emptied
//! `HeaderMap`s and hands them out again when it parses a guest's response head (an
//! HTTP/1.1 request's fields are read in place, `lines.rs`, and make no map). A map is two allocations (its index table and its entries); made for
//! every head and freed after it, that was four allocations and four frees per proxied
//! request, and with the tables' set-up about 2 % of its instructions (callgrind) — as
//! actix-http keeps its request and response heads in a per-thread pool.
//!
//! Bounded: at most [`KEPT`] maps per thread, each for at most [`MAX_KEPT_CAPACITY`]
//! headers (a larger one is freed). A map is emptied when it is given back: a kept map
//! holds no name or value, so no byte of any request or answer (values share their
//! connection's buffers) outlives its exchange.
//!
//! Pure: no I/O. Owns: the kept maps. Must not import anything of the service.

use std::cell::RefCell;

use http::HeaderMap;

/// The most maps a thread keeps: enough for the heads in flight between one
/// request's parse and another's end on a busy connection thread; more would only be
/// idle memory (about 1 KiB each).
pub const KEPT: usize = 8;

/// The most headers a kept map has room for: an event's head has a dozen; a map grown
/// for a hundred is freed, not kept.
pub const MAX_KEPT_CAPACITY: usize = 48;

thread_local! {
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `capacity` headers: a kept one if this thread has one.
pub fn take(capacity: usize) -> HeaderMap {
    // `try_with`: a thread being torn down has no kept maps.
    match MAPS.try_with(|maps| maps.borrow_mut().pop()).ok().flatten() {
        Some(mut map) => {
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Gives `map` back for a later [`take`] on this thread: emptied and kept, or freed
/// when the thread keeps enough or the map is larger than a kept one may be.
pub fn give_back(mut map: HeaderMap) {
    // A map that never had room (`HeaderMap::new()`, or one taken) is not worth keeping.
    if map.capacity() == 0 || map.capacity() > MAX_KEPT_CAPACITY {
        return;
    }
    map.clear();
    let _ = MAPS.try_with(|maps| {
        let mut maps = maps.borrow_mut();
        if maps.len() < KEPT {
            maps.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderValue, CONTENT_TYPE};

    /// The kept maps of this thread.
    fn kept() -> usize {
        MAPS.with(|maps| maps.borrow().len())
    }

    /// This thread keeps no map (whatever ran on it before).
    fn forget_kept() {
        MAPS.with(|maps| maps.borrow_mut().clear());
    }

    #[test]
    fn a_map_given_back_is_emptied_and_taken_again_without_an_allocation() {
        forget_kept();
        let mut map = take(24);
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let table = map.capacity();
        give_back(map);
        assert_eq!(kept(), 1);
        // A new map for one header would have room for a few; the kept one has its
        // table for 24.
        assert!(HeaderMap::<HeaderValue>::with_capacity(1).capacity() < table);
        let again = take(1);
        assert!(again.is_empty(), "nothing of the last head is left");
        assert_eq!(again.capacity(), table, "the kept table, not a new one");
        assert_eq!(kept(), 0);
        // More room than it had: it grows.
        give_back(again);
        assert!(take(40).capacity() >= 40);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_small_maps() {
        forget_kept();
        for _ in 0..KEPT + 5 {
            give_back(HeaderMap::with_capacity(8));
        }
        assert_eq!(kept(), KEPT);
        let before = kept();
        give_back(HeaderMap::with_capacity(MAX_KEPT_CAPACITY * 2));
        give_back(HeaderMap::new());
        assert_eq!(kept(), before, "a large map and one with no room are freed");
        for _ in 0..KEPT {
            take(1);
        }
        give_back(HeaderMap::with_capacity(MAX_KEPT_CAPACITY * 2));
        assert_eq!(kept(), 0, "freed even when the thread keeps none");
    }
}

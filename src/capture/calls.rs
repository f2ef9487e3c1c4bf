//! Large address-space calls, made whole.
//!
//! The kernel side sees a call through the mmap_lock holds it takes, and
//! writes the call's record again at every one of them: an mmap under
//! `mlockall(MCL_FUTURE)` or with `MAP_POPULATE` first maps under a write
//! hold, then populates under a read hold that can last seconds, and the
//! record of the first hold says that the second is still to come. A record
//! is given out once, when it is whole: a call is one sample, and its bytes
//! must not be counted twice.

use std::collections::HashMap;

use super::bpf::RawAddressChange;

/// How long a call whose population was announced may wait for it before
/// it is given out as it stands (the population failed, or took longer).
const POPULATION_WAIT_NS: u64 = 10_000_000_000;

/// How long a given-out call is remembered, so that a later record of it
/// (a population that took the lock again) is not given out as a new call.
const REMEMBERED_NS: u64 = 600_000_000_000;

/// A call is told apart by its thread and its first acquisition.
type CallId = (u32, u64);

#[derive(Debug, Default)]
pub(super) struct Calls {
    /// Calls whose population is still to come.
    waiting: HashMap<CallId, RawAddressChange>,
    /// Calls given out, by when they started.
    given: HashMap<CallId, u64>,
}

impl Calls {
    /// The calls that are whole among those drained at `now_ns`, and those
    /// that have waited long enough for their population.
    pub fn settle(&mut self, drained: Vec<RawAddressChange>, now_ns: u64) -> Vec<RawAddressChange> {
        let mut whole = Vec::new();
        for call in drained {
            let id = (call.tid, call.start_ns);
            if self.given.contains_key(&id) {
                continue;
            }
            if call.populate_pending {
                self.waiting.insert(id, call);
            } else {
                self.waiting.remove(&id);
                self.given.insert(id, call.start_ns);
                whole.push(call);
            }
        }
        let overdue: Vec<CallId> = self
            .waiting
            .iter()
            .filter(|(_, call)| {
                now_ns.saturating_sub(call.start_ns + call.duration_ns) >= POPULATION_WAIT_NS
            })
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(call) = self.waiting.remove(&id) {
                self.given.insert(id, call.start_ns);
                whole.push(call);
            }
        }
        self.given
            .retain(|_, start_ns| now_ns.saturating_sub(*start_ns) < REMEMBERED_NS);
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{AddressCall, StackRef};

    const MS: u64 = 1_000_000;

    fn mmap(start_ms: u64, duration_ms: u64, populate_pending: bool) -> RawAddressChange {
        RawAddressChange {
            tgid: 10,
            tid: 11,
            comm: [0; 16],
            call: AddressCall::Mmap,
            start_ns: start_ms * MS,
            duration_ns: duration_ms * MS,
            addr: 0,
            size: 1 << 30,
            arg: 0x22,
            populate_pending,
            user_stack: StackRef::Id(3),
        }
    }

    #[test]
    fn a_call_that_is_whole_is_given_out_at_once_and_once() {
        let mut calls = Calls::default();
        let out = calls.settle(vec![mmap(100, 5, false)], 200 * MS);
        assert_eq!(out, vec![mmap(100, 5, false)]);
        // A later record of the same call (the lock taken again) is not a new call.
        assert!(calls.settle(vec![mmap(100, 9, false)], 300 * MS).is_empty());
        // Another call of the same thread is.
        assert_eq!(calls.settle(vec![mmap(400, 5, false)], 500 * MS).len(), 1);
    }

    #[test]
    fn a_call_waits_for_its_population_then_is_given_out_whole() {
        let mut calls = Calls::default();
        assert!(calls.settle(vec![mmap(100, 1, true)], 200 * MS).is_empty());
        assert!(calls.settle(Vec::new(), 1000 * MS).is_empty());
        let out = calls.settle(vec![mmap(100, 2400, false)], 3000 * MS);
        assert_eq!(
            out,
            vec![mmap(100, 2400, false)],
            "with the population's time"
        );
        assert!(calls.settle(Vec::new(), 4000 * MS).is_empty());
    }

    #[test]
    fn a_population_that_never_comes_does_not_hold_the_call_forever() {
        let mut calls = Calls::default();
        assert!(calls.settle(vec![mmap(100, 1, true)], 200 * MS).is_empty());
        assert!(calls.settle(Vec::new(), 9000 * MS).is_empty());
        assert_eq!(
            calls.settle(Vec::new(), 10_200 * MS),
            vec![mmap(100, 1, true)]
        );
        // A population arriving after that is not counted again.
        assert!(calls
            .settle(vec![mmap(100, 11_000, false)], 12_000 * MS)
            .is_empty());
    }

    #[test]
    fn given_calls_are_forgotten_after_a_while() {
        let mut calls = Calls::default();
        calls.settle(vec![mmap(100, 1, false)], 200 * MS);
        calls.settle(Vec::new(), REMEMBERED_NS + 200 * MS);
        assert!(calls.given.is_empty());
    }
}

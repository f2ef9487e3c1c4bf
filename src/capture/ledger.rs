//! Cuts a continuous stream of off-CPU time into windows, exactly.
//!
//! The kernel adds a block's whole duration to its key only when the block
//! ends. A window that ends while a thread is still blocked must show that
//! thread up to the window's end, and the next window must show only the rest.
//! So at every cut we *credit* each block still in progress with the time since
//! it was last credited; when the block's full duration later arrives from the
//! kernel, what was credited is taken off it. Each nanosecond lands in one
//! window, and each block is counted once, in the first window that sees it.
//!
//! At a cut the finished totals are drained *before* the in-progress blocks
//! are read. A block present in that read was still in progress during the
//! drain, so its credit cannot be owed by this drain; a credited block missing
//! from it ended, and normally before the drain. (One that ends in the
//! microseconds between the two reads is repaid at the next cut instead.)

use foldhash::HashMap;

use super::{BlockKey, InFlight};

#[derive(Debug)]
pub(super) struct Ledger {
    min_block_ns: u64,
    max_block_ns: Option<u64>,
    credits: HashMap<BlockId, Credit>,
}

/// A block is told apart from every other by its thread and its start:
/// `(host tid, start_ns)`.
pub(super) type BlockId = (u32, u64);

#[derive(Debug, Clone, Copy)]
struct Credit {
    key: BlockKey,
    /// Credited up to here.
    until_ns: u64,
    credited_ns: u64,
    /// Cuts since the block left the in-progress set without being repaid.
    unpaid_cuts: u32,
}

/// A credit still unpaid this many cuts after its block ended is written off:
/// the kernel refused the block (longer than max_block, or a full map).
const WRITE_OFF_AFTER_CUTS: u32 = 2;

/// One window's off-CPU time: `(key, blocked_ns, count)`.
pub(super) type Settled = Vec<(BlockKey, u64, u64)>;

impl Ledger {
    pub fn new(min_block_ns: u64, max_block_ns: Option<u64>) -> Self {
        Ledger {
            min_block_ns,
            max_block_ns,
            credits: HashMap::default(),
        }
    }

    /// Closes a window at `now_ns`. `finished` must have been drained from
    /// the kernel before `in_flight` was read.
    pub fn settle(
        &mut self,
        now_ns: u64,
        finished: &[(BlockKey, u64, u64)],
        in_flight: &[InFlight],
    ) -> Settled {
        let still_blocked: HashMap<BlockId, &InFlight> = in_flight
            .iter()
            .map(|block| ((block.host_tid, block.start_ns), block))
            .collect();
        let mut window: HashMap<BlockKey, (u64, u64)> = HashMap::default();

        // Credits of blocks that have ended, by key (as far as it is
        // settled while the block runs: a futex wait is credited before its
        // waker is known, and ends with it).
        let mut ended: HashMap<BlockKey, Vec<BlockId>> = HashMap::default();
        for (&id, credit) in &self.credits {
            if !still_blocked.contains_key(&id) {
                ended
                    .entry(credit.key.settled_identity())
                    .or_default()
                    .push(id);
            }
        }
        // A futex word woken by several threads ends under one key per
        // waker: totals that share a settled identity are repaid together.
        let mut by_identity: HashMap<BlockKey, Vec<(BlockKey, u64, u64)>> = HashMap::default();
        for &(key, blocked_ns, count) in finished {
            by_identity
                .entry(key.settled_identity())
                .or_default()
                .push((key, blocked_ns, count));
        }
        for (identity, mut totals) in by_identity {
            let credited: Vec<u64> = ended
                .remove(&identity)
                .unwrap_or_default()
                .into_iter()
                .map(|id| {
                    let credit = self.credits.remove(&id).expect("listed from credits");
                    credit.credited_ns
                })
                .collect();
            repay(&mut totals, credited);
            for (key, blocked_ns, count) in totals {
                if blocked_ns > 0 || count > 0 {
                    let entry = window.entry(key).or_default();
                    entry.0 += blocked_ns;
                    entry.1 += count;
                }
            }
        }
        self.credits.retain(|id, credit| {
            if still_blocked.contains_key(id) {
                return true;
            }
            credit.unpaid_cuts += 1;
            credit.unpaid_cuts < WRITE_OFF_AFTER_CUTS
        });

        for block in in_flight {
            // Ended, its total on the way, or not yet given its stacks: the
            // credit (if any) stays, and grows no more.
            if block.owed || !block.surveyed {
                continue;
            }
            let age_ns = now_ns.saturating_sub(block.start_ns);
            // Never credit what the kernel will throw away: below min_block
            // the block may still end short; past max_block it will be refused.
            if age_ns < self.min_block_ns || self.max_block_ns.is_some_and(|max| age_ns > max) {
                continue;
            }
            let id = (block.host_tid, block.start_ns);
            let credit = self.credits.entry(id).or_insert(Credit {
                key: block.key,
                until_ns: block.start_ns,
                credited_ns: 0,
                unpaid_cuts: 0,
            });
            let first_sight = u64::from(credit.credited_ns == 0);
            let credit_ns = now_ns.saturating_sub(credit.until_ns);
            credit.until_ns = now_ns;
            credit.credited_ns += credit_ns;
            let entry = window.entry(block.key).or_default();
            entry.0 += credit_ns;
            entry.1 += first_sight;
        }

        window
            .into_iter()
            .map(|(key, (blocked_ns, count))| (key, blocked_ns, count))
            .collect()
    }
}

/// Takes what was credited to ended blocks off the totals they ended under.
///
/// Each credited block ended under one of `totals` (they all share its
/// settled identity); which one is known only when there is one. A credit
/// goes to the total with the most time left among those that still count
/// a block. That total is at least as long as the block's own, so the sum
/// stays exact; only which waker a wait is put under can be wrong, when one
/// thread's waits on one word ended under several wakers in one window and
/// another of them was the longer. (A thread is in one block at a time, so a
/// cut has one ended credit per thread, two when a block ended between a
/// drain and a read.) Taken off whichever total came first, a credit could
/// be clamped at a short wait's length and the rest counted twice.
fn repay(totals: &mut [(BlockKey, u64, u64)], mut credited: Vec<u64>) {
    credited.sort_unstable_by(|a, b| b.cmp(a));
    for credited_ns in credited {
        let Some((_, blocked_ns, count)) = totals
            .iter_mut()
            .max_by_key(|(_, blocked_ns, count)| (*count > 0, *blocked_ns))
        else {
            return;
        };
        *blocked_ns -= credited_ns.min(*blocked_ns);
        // The block was counted when first credited.
        *count = count.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::StackRef;
    use crate::profile::ThreadState;

    const MS: u64 = 1_000_000;

    fn key(tid: u32) -> BlockKey {
        BlockKey {
            tgid: 100,
            tid,
            kernel_stack: StackRef::Id(u64::from(tid)),
            user_stack: StackRef::Id(u64::from(tid) + 1000),
            state: ThreadState::Sleeping,
            lock: None,
        }
    }

    fn in_flight(tid: u32, start_ns: u64) -> InFlight {
        InFlight {
            host_tid: tid,
            start_ns,
            owed: false,
            surveyed: true,
            regs: None,
            key: key(tid),
        }
    }

    fn totals(settled: Settled) -> HashMap<u32, (u64, u64)> {
        settled
            .into_iter()
            .map(|(key, ns, count)| (key.tid, (ns, count)))
            .collect()
    }

    #[test]
    fn finished_blocks_pass_through() {
        let mut ledger = Ledger::new(MS, None);
        let window = totals(ledger.settle(1000 * MS, &[(key(1), 40 * MS, 4)], &[]));
        assert_eq!(window[&1], (40 * MS, 4));
    }

    #[test]
    fn a_block_spanning_windows_is_split_at_each_cut() {
        let mut ledger = Ledger::new(MS, None);
        // Blocked at 100 ms; cuts at 1 s and 2 s; wakes at 2.5 s.
        let first = totals(ledger.settle(1000 * MS, &[], &[in_flight(1, 100 * MS)]));
        assert_eq!(first[&1], (900 * MS, 1));
        let second = totals(ledger.settle(2000 * MS, &[], &[in_flight(1, 100 * MS)]));
        assert_eq!(second[&1], (1000 * MS, 0));
        // The kernel reports the whole 2.4 s when it ends.
        let third = totals(ledger.settle(3000 * MS, &[(key(1), 2400 * MS, 1)], &[]));
        assert_eq!(third[&1], (500 * MS, 0));
        assert_eq!(first[&1].0 + second[&1].0 + third[&1].0, 2400 * MS);
    }

    #[test]
    fn other_blocks_of_the_same_key_are_not_eaten_by_credit() {
        let mut ledger = Ledger::new(MS, None);
        ledger.settle(1000 * MS, &[], &[in_flight(1, 500 * MS)]);
        // Ends at 1.2 s (700 ms in all), then another 50 ms block of the key.
        let window = totals(ledger.settle(2000 * MS, &[(key(1), 750 * MS, 2)], &[]));
        assert_eq!(window[&1], (250 * MS, 1));
    }

    #[test]
    fn a_new_block_of_the_same_thread_starts_a_new_credit() {
        let mut ledger = Ledger::new(MS, None);
        ledger.settle(1000 * MS, &[], &[in_flight(1, 900 * MS)]);
        // Woke at 1.1 s (200 ms in all), blocked again at 1.5 s.
        let window = totals(ledger.settle(
            2000 * MS,
            &[(key(1), 200 * MS, 1)],
            &[in_flight(1, 1500 * MS)],
        ));
        // 100 ms rest of the first block + 500 ms of the second, 1 new block.
        assert_eq!(window[&1], (600 * MS, 1));
        // The second ends at 2.2 s: only its last 200 ms are left.
        let next = totals(ledger.settle(3000 * MS, &[(key(1), 700 * MS, 1)], &[]));
        assert_eq!(next[&1], (200 * MS, 0));
    }

    #[test]
    fn a_block_that_ends_after_the_drain_is_repaid_at_the_next_cut() {
        let mut ledger = Ledger::new(MS, None);
        ledger.settle(1000 * MS, &[], &[in_flight(1, 400 * MS)]);
        // Ended between the drain and the read at 2 s: not in either.
        assert!(ledger.settle(2000 * MS, &[], &[]).is_empty());
        // Its 1.1 s total arrives with the next drain.
        let window = totals(ledger.settle(3000 * MS, &[(key(1), 1100 * MS, 1)], &[]));
        assert_eq!(window[&1], (500 * MS, 0));
    }

    #[test]
    fn blocks_younger_than_min_block_are_not_credited() {
        let mut ledger = Ledger::new(10 * MS, None);
        assert!(ledger
            .settle(1000 * MS, &[], &[in_flight(1, 995 * MS)])
            .is_empty());
        // When it does end long enough, it is counted whole.
        let window = totals(ledger.settle(2000 * MS, &[(key(1), 20 * MS, 1)], &[]));
        assert_eq!(window[&1], (20 * MS, 1));
    }

    #[test]
    fn credit_for_a_block_the_kernel_refused_is_written_off() {
        let mut ledger = Ledger::new(MS, Some(1500 * MS));
        ledger.settle(1000 * MS, &[], &[in_flight(1, 0)]);
        // Past max_block: no longer credited; the kernel drops it when it ends.
        assert!(ledger.settle(2000 * MS, &[], &[in_flight(1, 0)]).is_empty());
        ledger.settle(3000 * MS, &[], &[]);
        ledger.settle(4000 * MS, &[], &[]);
        // A later ordinary block of the key is reported whole.
        let window = totals(ledger.settle(5000 * MS, &[(key(1), 30 * MS, 1)], &[]));
        assert_eq!(window[&1], (30 * MS, 1));
    }

    #[test]
    fn a_block_whose_user_stack_comes_at_its_end_is_counted_once() {
        let mut ledger = Ledger::new(MS, None);
        // In flight at the cut: only its saved registers give a user stack.
        let flying = InFlight {
            key: BlockKey {
                user_stack: StackRef::SavedRegs,
                ..key(1)
            },
            ..in_flight(1, 0)
        };
        let first = totals(ledger.settle(1000 * MS, &[], &[flying]));
        assert_eq!(first[&1], (1000 * MS, 1));
        // Ended at 1.5 s; its user stack is owed until the thread heads back
        // to user space: no more credit, and the credit is not written off.
        let owed = InFlight {
            owed: true,
            ..flying
        };
        for cut in 2..5 {
            assert!(ledger.settle(cut * 1000 * MS, &[], &[owed]).is_empty());
        }
        // The total arrives under the stack the kernel took: only the rest.
        let last = ledger.settle(5000 * MS, &[(key(1), 1500 * MS, 1)], &[]);
        assert_eq!(last, vec![(key(1), 500 * MS, 0)]);
    }

    #[test]
    fn a_block_credited_from_saved_registers_is_repaid_by_its_copied_stack_s_total() {
        let mut ledger = Ledger::new(MS, None);
        let flying = InFlight {
            key: BlockKey {
                user_stack: StackRef::SavedRegs,
                ..key(1)
            },
            ..in_flight(1, 0)
        };
        let first = ledger.settle(1000 * MS, &[], &[flying]);
        assert_eq!(first, vec![(flying.key, 1000 * MS, 1)]);
        // It reached the unwind threshold: its total arrives under a copy
        // of its user stack, which the in-flight part never had.
        let copied = BlockKey {
            user_stack: StackRef::Copy(7 << 24 | 4),
            ..key(1)
        };
        let second = ledger.settle(2000 * MS, &[(copied, 1200 * MS, 1)], &[]);
        assert_eq!(second, vec![(copied, 200 * MS, 0)]);
        let counted: u64 = first.iter().chain(&second).map(|(_, ns, _)| ns).sum();
        assert_eq!(counted, 1200 * MS, "each nanosecond once");
    }

    #[test]
    fn a_block_the_survey_has_not_completed_is_not_credited() {
        let mut ledger = Ledger::new(MS, None);
        let unsurveyed = InFlight {
            surveyed: false,
            ..in_flight(1, 0)
        };
        assert!(ledger.settle(1000 * MS, &[], &[unsurveyed]).is_empty());
        // Its total arrives whole.
        let window = totals(ledger.settle(2000 * MS, &[(key(1), 1500 * MS, 1)], &[]));
        assert_eq!(window[&1], (1500 * MS, 1));
    }

    /// Thread 1 waiting on futex word 0x1000, woken by `waker` if known.
    fn futex_wait(waker: Option<u32>) -> BlockKey {
        BlockKey {
            lock: Some(crate::capture::LockWait::futex(0x1000, waker)),
            ..key(1)
        }
    }

    #[test]
    fn a_futex_wait_that_learns_its_waker_at_the_end_is_counted_once() {
        let waiting = futex_wait(None);
        let woken = futex_wait(Some(7));
        let mut ledger = Ledger::new(MS, None);
        let block = InFlight {
            key: waiting,
            ..in_flight(1, 0)
        };
        let first = ledger.settle(1000 * MS, &[], &[block]);
        assert_eq!(first, vec![(waiting, 1000 * MS, 1)]);
        // Woken by tid 7 at 1.5 s: only the last 500 ms are new, under the waker.
        let second = ledger.settle(2000 * MS, &[(woken, 1500 * MS, 1)], &[]);
        assert_eq!(second, vec![(woken, 500 * MS, 0)]);
    }

    #[test]
    fn a_credited_futex_wait_is_repaid_by_its_own_waker_s_total_whatever_the_order() {
        // A 1.5 s wait woken by tid 7 ends in the same window as a 2 ms wait
        // on the same word woken by tid 9: two totals, one identity.
        let long = (futex_wait(Some(7)), 1500 * MS, 1);
        let short = (futex_wait(Some(9)), 2 * MS, 1);
        for finished in [[short, long], [long, short]] {
            let mut ledger = Ledger::new(MS, None);
            let block = InFlight {
                key: futex_wait(None),
                ..in_flight(1, 0)
            };
            let first = ledger.settle(1000 * MS, &[], &[block]);
            let mut second = ledger.settle(2000 * MS, &finished, &[]);
            second.sort_by_key(|(key, _, _)| key.lock.and_then(|lock| lock.holder_tid));
            assert_eq!(
                second,
                vec![(long.0, 500 * MS, 0), (short.0, 2 * MS, 1)],
                "finished in the order {finished:?}"
            );
            let counted: u64 = first.iter().chain(&second).map(|(_, ns, _)| ns).sum();
            assert_eq!(counted, long.1 + short.1, "each nanosecond once");
        }
    }
}

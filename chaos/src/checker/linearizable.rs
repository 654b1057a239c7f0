//! A linearizability checker in the style of Knossos and Porcupine: the Wing & Gong search with
//! Lowe's just-in-time linearization and memoization of (linearized set, model state), run per
//! key (P-compositionality: a history is linearizable iff every key's sub-history is).
//!
//! Each operation has an invocation time, a return time and its input and output folded into
//! one value the [`Model`] judges. An operation whose outcome is unknown has no return time
//! (an open end): it may take effect at any point after its invocation, or never. The search
//! succeeds once every operation with a return time is linearized; unknown ones are linearized
//! only where that helps.
//!
//! [`Register`] is the model the harness uses: a register of unique values with read, write,
//! compare-and-set and rejected compare-and-set (a `412` is an observation too: at its
//! linearization point the register did not hold the expected value).

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash + Debug;
    /// An operation's input together with its observed output.
    type Input: Debug;

    fn init(&self) -> Self::State;

    /// The state after `input` applied to `state`, or `None` when the observed output is
    /// impossible in `state`.
    fn step(&self, state: &Self::State, input: &Self::Input) -> Option<Self::State>;
}

/// One operation of a single key's history.
#[derive(Debug, Clone)]
pub struct Operation<I> {
    pub call: u64,
    /// `None`: the outcome is unknown; it may take effect any time after `call`, or never.
    pub ret: Option<u64>,
    pub input: I,
}

/// Why a history is not linearizable: the longest linearizable prefix the search found and the
/// operation that could not follow it.
#[derive(Debug, Clone)]
pub struct Evidence<S> {
    /// Indexes (into the checked slice) of the longest prefix that could be linearized.
    pub prefix: Vec<usize>,
    /// The model state after that prefix.
    pub state: S,
    /// The operation that had to be linearized next (its return came) and could not be.
    pub stuck: usize,
    /// The other operations that were pending (invoked, not linearized) at that point.
    pub pending: Vec<usize>,
}

/// The checker's answer.
#[derive(Debug, Clone)]
pub enum Verdict<S> {
    Linearizable,
    Violation(Evidence<S>),
    /// The search ran out of its step or time budget.
    Inconclusive {
        steps: u64,
    },
}

impl<S> Verdict<S> {
    #[cfg(test)]
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

/// Bounds of one search.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_steps: u64,
    pub max_time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_steps: 20_000_000,
            max_time: Duration::from_secs(60),
        }
    }
}

/// A set of operation indexes, hashable for the memo table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)])
    }

    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn clear(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
}

/// The history as a doubly linked list of call and return events in time order, from which
/// linearized operations are lifted (and put back when the search backtracks).
struct Events {
    events: Vec<Event>,
    next: Vec<usize>,
    prev: Vec<usize>,
    ret_pos: Vec<Option<usize>>,
}

const HEAD: usize = 0;

impl Events {
    fn new<I>(ops: &[Operation<I>]) -> Self {
        // (time, 0 for a call / 1 for a return): at equal times calls come first, so operations
        // that touch are concurrent, never ordered.
        let mut timed: Vec<(u64, u8, Event)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            timed.push((
                op.call,
                0,
                Event {
                    op: i,
                    is_call: true,
                },
            ));
            if let Some(r) = op.ret {
                timed.push((
                    r.max(op.call),
                    1,
                    Event {
                        op: i,
                        is_call: false,
                    },
                ));
            }
        }
        timed.sort_by_key(|(t, k, e)| (*t, *k, e.op));
        // Positions 1..=m are events; 0 is the head and m+1 the tail sentinel.
        let m = timed.len();
        let mut events = Vec::with_capacity(m + 2);
        events.push(Event {
            op: usize::MAX,
            is_call: false,
        });
        let mut ret_pos = vec![None; ops.len()];
        for (pos, (_, _, e)) in timed.into_iter().enumerate() {
            if !e.is_call {
                ret_pos[e.op] = Some(pos + 1);
            }
            events.push(e);
        }
        events.push(Event {
            op: usize::MAX,
            is_call: false,
        });
        let next = (0..m + 2).map(|i| (i + 1).min(m + 1)).collect();
        let prev = (0..m + 2).map(|i| i.saturating_sub(1)).collect();
        Events {
            events,
            next,
            prev,
            ret_pos,
        }
    }

    fn tail(&self) -> usize {
        self.events.len() - 1
    }

    fn unlink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn relink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = i;
        self.prev[n] = i;
    }

    /// Removes an operation's call (at `call_pos`) and return from the list.
    fn lift(&mut self, call_pos: usize) {
        self.unlink(call_pos);
        if let Some(r) = self.ret_pos[self.events[call_pos].op] {
            self.unlink(r);
        }
    }

    /// Undoes [`Events::lift`] (in reverse order, as dancing links require).
    fn unlift(&mut self, call_pos: usize) {
        if let Some(r) = self.ret_pos[self.events[call_pos].op] {
            self.relink(r);
        }
        self.relink(call_pos);
    }

    /// The operations whose calls are in the list before position `upto`.
    fn pending_before(&self, upto: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut i = self.next[HEAD];
        while i != upto && i != self.tail() {
            if self.events[i].is_call {
                out.push(self.events[i].op);
            }
            i = self.next[i];
        }
        out
    }
}

/// Checks one key's history against `model`.
pub fn check<M: Model>(
    model: &M,
    ops: &[Operation<M::Input>],
    budget: Budget,
) -> Verdict<M::State> {
    let mut ev = Events::new(ops);
    let tail = ev.tail();
    let mut linearized = BitSet::new(ops.len());
    let mut cache: HashSet<(BitSet, M::State)> = HashSet::new();
    // (position of the call event, state before the operation)
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut best: Option<Evidence<M::State>> = None;
    let started = Instant::now();
    let mut steps: u64 = 0;
    let mut pos = ev.next[HEAD];
    loop {
        steps += 1;
        if steps > budget.max_steps
            || (steps.is_multiple_of(4096) && started.elapsed() > budget.max_time)
        {
            return Verdict::Inconclusive { steps };
        }
        if pos == tail {
            // No return event is left: every operation that completed is linearized.
            return Verdict::Linearizable;
        }
        let e = ev.events[pos];
        if e.is_call {
            if let Some(next_state) = model.step(&state, &ops[e.op].input) {
                let mut with = linearized.clone();
                with.set(e.op);
                if cache.insert((with.clone(), next_state.clone())) {
                    stack.push((pos, std::mem::replace(&mut state, next_state)));
                    linearized = with;
                    ev.lift(pos);
                    pos = ev.next[HEAD];
                    continue;
                }
            }
            pos = ev.next[pos];
            continue;
        }
        // The return of an operation that is not linearized: what is on the stack cannot be
        // extended. Remember the deepest such point as evidence, then backtrack.
        if best.as_ref().is_none_or(|b| stack.len() > b.prefix.len()) {
            best = Some(Evidence {
                prefix: stack.iter().map(|(p, _)| ev.events[*p].op).collect(),
                state: state.clone(),
                stuck: e.op,
                pending: ev
                    .pending_before(pos)
                    .into_iter()
                    .filter(|o| *o != e.op)
                    .collect(),
            });
        }
        let Some((call_pos, before)) = stack.pop() else {
            return match best {
                Some(b) => Verdict::Violation(b),
                None => Verdict::Inconclusive { steps },
            };
        };
        linearized.clear(ev.events[call_pos].op);
        state = before;
        ev.unlift(call_pos);
        pos = ev.next[call_pos];
    }
}

/// An operation on a register of unique values (each write writes a value no other write
/// writes), with the output it observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOp {
    /// A read that returned this value.
    Read(u64),
    /// A compare-and-set that applied (or, with an open end, may have).
    Cas { from: u64, to: u64 },
    /// A compare-and-set the register refused: it did not hold `from`.
    CasRejected { from: u64 },
}

/// The register model, starting at `initial`.
#[derive(Debug, Clone, Copy)]
pub struct Register {
    pub initial: u64,
}

impl Model for Register {
    type State = u64;
    type Input = RegisterOp;

    fn init(&self) -> u64 {
        self.initial
    }

    fn step(&self, state: &u64, input: &RegisterOp) -> Option<u64> {
        match *input {
            RegisterOp::Read(v) => (v == *state).then_some(*state),
            RegisterOp::Cas { from, to } => (from == *state).then_some(to),
            RegisterOp::CasRejected { from } => (from != *state).then_some(*state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(_id: usize, call: u64, ret: Option<u64>, input: RegisterOp) -> Operation<RegisterOp> {
        Operation { call, ret, input }
    }

    fn verdict(ops: &[Operation<RegisterOp>]) -> Verdict<u64> {
        check(&Register { initial: 0 }, ops, Budget::default())
    }

    use RegisterOp::*;

    #[test]
    fn empty_and_sequential_histories_are_linearizable() {
        assert!(verdict(&[]).is_linearizable());
        let h = [
            op(0, 0, Some(1), Read(0)),
            op(1, 2, Some(3), Cas { from: 0, to: 1 }),
            op(2, 4, Some(5), Read(1)),
            op(3, 6, Some(7), CasRejected { from: 0 }),
            op(4, 8, Some(9), Cas { from: 1, to: 2 }),
            op(5, 10, Some(11), Read(2)),
        ];
        assert!(verdict(&h).is_linearizable());
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_a_violation() {
        let h = [
            op(0, 0, Some(10), Cas { from: 0, to: 1 }),
            op(1, 20, Some(30), Read(0)),
        ];
        match verdict(&h) {
            Verdict::Violation(e) => {
                assert_eq!(e.stuck, 1);
                assert_eq!(e.prefix, vec![0]);
                assert_eq!(e.state, 1);
            }
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn concurrent_reads_may_see_old_or_new_value() {
        let h = [
            op(0, 0, Some(100), Cas { from: 0, to: 1 }),
            op(1, 10, Some(20), Read(1)),
            op(2, 30, Some(40), Read(1)),
        ];
        assert!(verdict(&h).is_linearizable());
        let h = [
            op(0, 0, Some(100), Cas { from: 0, to: 1 }),
            op(1, 10, Some(20), Read(0)),
            op(2, 30, Some(40), Read(1)),
        ];
        assert!(verdict(&h).is_linearizable());
        // ...but not new then old.
        let h = [
            op(0, 0, Some(100), Cas { from: 0, to: 1 }),
            op(1, 10, Some(20), Read(1)),
            op(2, 30, Some(40), Read(0)),
        ];
        assert!(!verdict(&h).is_linearizable());
    }

    #[test]
    fn two_successful_cas_from_the_same_value_are_a_lost_update() {
        let h = [
            op(0, 0, Some(10), Cas { from: 0, to: 1 }),
            op(1, 1, Some(11), Cas { from: 0, to: 2 }),
        ];
        assert!(!verdict(&h).is_linearizable());
    }

    #[test]
    fn a_rejected_cas_needs_a_state_other_than_its_expectation() {
        // Rejected while nothing else could have changed the register: a violation.
        let h = [op(0, 0, Some(10), CasRejected { from: 0 })];
        assert!(!verdict(&h).is_linearizable());
        // Rejected concurrently with a change: fine.
        let h = [
            op(0, 0, Some(10), CasRejected { from: 0 }),
            op(1, 5, Some(6), Cas { from: 0, to: 1 }),
        ];
        assert!(verdict(&h).is_linearizable());
    }

    #[test]
    fn unknown_operations_may_apply_late_or_never() {
        // Never applied.
        let h = [
            op(0, 0, None, Cas { from: 0, to: 1 }),
            op(1, 50, Some(60), Read(0)),
        ];
        assert!(verdict(&h).is_linearizable());
        // Applied long after the client gave up.
        let h = [
            op(0, 0, None, Cas { from: 0, to: 1 }),
            op(1, 50, Some(60), Read(0)),
            op(2, 70, Some(80), Read(1)),
        ];
        assert!(verdict(&h).is_linearizable());
        // But not before it was invoked.
        let h = [
            op(0, 0, Some(10), Read(1)),
            op(1, 20, None, Cas { from: 0, to: 1 }),
        ];
        assert!(!verdict(&h).is_linearizable());
        // And not twice: after 1 was overwritten by 2, it cannot come back.
        let h = [
            op(0, 0, None, Cas { from: 0, to: 1 }),
            op(1, 10, Some(20), Read(1)),
            op(2, 30, Some(40), Cas { from: 1, to: 2 }),
            op(3, 50, Some(60), Read(1)),
        ];
        assert!(!verdict(&h).is_linearizable());
    }

    #[test]
    fn reads_of_values_nobody_wrote_are_violations() {
        let h = [op(0, 0, Some(1), Read(7))];
        assert!(!verdict(&h).is_linearizable());
    }

    #[test]
    fn the_budget_bounds_the_search() {
        let h: Vec<_> = (0..40)
            .map(|i| {
                op(
                    i,
                    0,
                    Some(1000),
                    Cas {
                        from: 0,
                        to: 1000 + i as u64,
                    },
                )
            })
            .collect();
        let v = check(
            &Register { initial: 0 },
            &h,
            Budget {
                max_steps: 100,
                max_time: Duration::from_secs(5),
            },
        );
        assert!(matches!(v, Verdict::Inconclusive { .. }), "{v:?}");
    }

    /// An independent, exponential search: pick any operation that no remaining completed
    /// operation must precede, as long as the model accepts it.
    fn brute(ops: &[Operation<RegisterOp>]) -> bool {
        fn go(ops: &[Operation<RegisterOp>], used: &mut Vec<bool>, state: u64) -> bool {
            let all_required_done = ops
                .iter()
                .enumerate()
                .all(|(i, o)| used[i] || o.ret.is_none());
            if all_required_done {
                return true;
            }
            for i in 0..ops.len() {
                if used[i] {
                    continue;
                }
                let blocked = ops
                    .iter()
                    .enumerate()
                    .any(|(j, p)| !used[j] && j != i && p.ret.is_some_and(|r| r < ops[i].call));
                if blocked {
                    continue;
                }
                if let Some(next) = (Register { initial: 0 }).step(&state, &ops[i].input) {
                    used[i] = true;
                    if go(ops, used, next) {
                        return true;
                    }
                    used[i] = false;
                }
            }
            false
        }
        go(ops, &mut vec![false; ops.len()], 0)
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut bad = 0;
        for _ in 0..3000 {
            let n = rng.usize(1..=6);
            let mut next_value = 1;
            let ops: Vec<_> = (0..n)
                .map(|i| {
                    let call = rng.u64(0..20);
                    let ret = if rng.u8(0..5) == 0 {
                        None
                    } else {
                        Some(call + rng.u64(0..10))
                    };
                    let known = rng.u64(0..next_value + 1);
                    let input = match rng.u8(0..3) {
                        0 => Read(known),
                        1 => CasRejected { from: known },
                        _ => {
                            next_value += 1;
                            Cas {
                                from: known,
                                to: next_value,
                            }
                        }
                    };
                    op(i, call, ret, input)
                })
                .collect();
            let fast = verdict(&ops).is_linearizable();
            assert_eq!(fast, brute(&ops), "disagreement on {ops:?}");
            if !fast {
                bad += 1;
            }
        }
        // Both kinds of history were exercised.
        assert!(bad > 100 && bad < 2900, "{bad}");
    }
}

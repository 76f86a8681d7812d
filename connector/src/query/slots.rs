//! Shared capacity handed out fairly between organizations.
//!
//! A plain semaphore serves whoever asks first, so one organization that
//! sends many heavy queries takes every execution slot and everyone else
//! waits behind it. [`FairSlots`] caps what one organization may hold at
//! once, and when a slot frees up it goes to the waiting organization that
//! holds the fewest (then to whoever waited longest), so a second tenant's
//! small query starts as soon as any slot is free.
//!
//! The queue in front of the slots is bounded too, in all and per
//! organization: under overload a newcomer beyond it is refused at once
//! (RESOURCE_EXHAUSTED) instead of piling up, and one tenant's flood cannot
//! fill the queue for everyone else.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Slots for one kind of work (query executions, planning).
pub struct FairSlots {
    state: Mutex<State>,
    /// Slots in all.
    total: usize,
    /// Slots one organization may hold at once.
    per_organization: usize,
    /// How many may wait for a slot.
    queue: QueueLimits,
}

/// How many requests may wait for a slot: in all, and of one organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub total: usize,
    pub per_organization: usize,
}

#[derive(Default)]
struct State {
    held: usize,
    by_organization: HashMap<String, usize>,
    waiting: VecDeque<Waiter>,
    next_waiter: u64,
}

struct Waiter {
    id: u64,
    organization: String,
    wake: oneshot::Sender<Slot>,
}

/// One slot, returned when dropped.
pub struct Slot {
    slots: Arc<FairSlots>,
    organization: String,
}

/// Why no slot was handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// None came free before the deadline.
    TimedOut,
    /// The queue (in all, or the organization's share of it) was full: the
    /// request was refused without waiting.
    QueueFull,
}

impl FairSlots {
    pub fn new(total: usize, per_organization: usize, queue: QueueLimits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            total: total.max(1),
            per_organization: per_organization.clamp(1, total.max(1)),
            queue: QueueLimits {
                total: queue.total,
                per_organization: queue.per_organization.min(queue.total),
            },
        })
    }

    pub fn queue(&self) -> QueueLimits {
        self.queue
    }

    /// Requests waiting now, in all and of `organization`.
    pub fn waiting(&self, organization: &str) -> (usize, usize) {
        let state = self.lock();
        Self::queued(&state, organization)
    }

    fn queued(state: &State, organization: &str) -> (usize, usize) {
        let live = state.waiting.iter().filter(|w| !w.wake.is_closed());
        let (mut all, mut own) = (0, 0);
        for w in live {
            all += 1;
            own += usize::from(w.organization == organization);
        }
        (all, own)
    }

    /// Slots held now, in all and by `organization`.
    pub fn held(&self, organization: &str) -> (usize, usize) {
        let state = self.lock();
        let own = state
            .by_organization
            .get(organization)
            .copied()
            .unwrap_or(0);
        (state.held, own)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn per_organization(&self) -> usize {
        self.per_organization
    }

    /// Waits until `organization` may take a slot, at most until `deadline`;
    /// refuses at once if the queue has no room for it.
    pub async fn acquire(
        self: &Arc<Self>,
        organization: &str,
        deadline: Instant,
    ) -> Result<Slot, NoSlot> {
        let (id, woken) = {
            let mut state = self.lock();
            if self.may_start_now(&state, organization) {
                return Ok(self.grant(&mut state, organization));
            }
            let (all, own) = Self::queued(&state, organization);
            if all >= self.queue.total || own >= self.queue.per_organization {
                return Err(NoSlot::QueueFull);
            }
            // Waiters that gave up are dropped here too, so the queue never
            // grows past its bound with stale entries.
            state.waiting.retain(|w| !w.wake.is_closed());
            let (wake, woken) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter += 1;
            state.waiting.push_back(Waiter {
                id,
                organization: organization.to_string(),
                wake,
            });
            (id, woken)
        };
        match tokio::time::timeout_at(deadline, woken).await {
            Ok(Ok(slot)) => Ok(slot),
            // The sender is only dropped with the FairSlots itself.
            Ok(Err(_)) => Err(NoSlot::TimedOut),
            Err(_) => {
                // Gone from the queue, or granted in the meantime: a slot
                // granted to a dropped receiver is dropped with the channel,
                // which hands it on.
                self.lock().waiting.retain(|w| w.id != id);
                Err(NoSlot::TimedOut)
            }
        }
    }

    /// A newcomer starts at once only if a slot is free, its organization is
    /// under its cap, and no waiting organization has a better claim (fewer
    /// slots held): otherwise it would overtake the queue.
    fn may_start_now(&self, state: &State, organization: &str) -> bool {
        let own = state
            .by_organization
            .get(organization)
            .copied()
            .unwrap_or(0);
        if state.held >= self.total || own >= self.per_organization {
            return false;
        }
        !state.waiting.iter().any(|w| {
            let theirs = state
                .by_organization
                .get(&w.organization)
                .copied()
                .unwrap_or(0);
            theirs < self.per_organization && theirs <= own
        })
    }

    fn grant(self: &Arc<Self>, state: &mut State, organization: &str) -> Slot {
        state.held += 1;
        *state
            .by_organization
            .entry(organization.to_string())
            .or_default() += 1;
        Slot {
            slots: self.clone(),
            organization: organization.to_string(),
        }
    }

    /// Returns a slot and hands free ones to waiters: the organization with
    /// the fewest slots held first, in arrival order among equals.
    fn release(self: &Arc<Self>, organization: &str) {
        let mut handed = Vec::new();
        {
            let mut state = self.lock();
            state.held -= 1;
            if let Some(n) = state.by_organization.get_mut(organization) {
                *n -= 1;
                if *n == 0 {
                    state.by_organization.remove(organization);
                }
            }
            while state.held < self.total {
                let Some(next) = self.next_waiter(&state) else {
                    break;
                };
                let waiter = state.waiting.remove(next).expect("index from the queue");
                let slot = self.grant(&mut state, &waiter.organization);
                handed.push((waiter.wake, slot));
            }
        }
        // Outside the lock: a slot whose waiter gave up comes straight back
        // through its own drop.
        for (wake, slot) in handed {
            let _ = wake.send(slot);
        }
    }

    fn next_waiter(&self, state: &State) -> Option<usize> {
        let held = |org: &str| state.by_organization.get(org).copied().unwrap_or(0);
        state
            .waiting
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.wake.is_closed() && held(&w.organization) < self.per_organization)
            .min_by_key(|(i, w)| (held(&w.organization), *i))
            .map(|(i, _)| i)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.organization);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("organization", &self.organization)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ROOMY: QueueLimits = QueueLimits {
        total: 1_000,
        per_organization: 1_000,
    };

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn one_organization_cannot_take_every_slot() {
        let slots = FairSlots::new(4, 2, ROOMY);
        let a1 = slots.acquire("a", soon()).await.unwrap();
        let _a2 = slots.acquire("a", soon()).await.unwrap();
        let third = slots
            .acquire("a", Instant::now() + Duration::from_millis(50))
            .await;
        assert_eq!(third.unwrap_err(), NoSlot::TimedOut);
        let _b = slots.acquire("b", soon()).await.unwrap();
        assert_eq!(slots.held("a"), (3, 2));
        drop(a1);
        assert_eq!(slots.held("a"), (2, 1));
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_organization_holding_fewest() {
        let slots = FairSlots::new(2, 2, ROOMY);
        let a1 = slots.acquire("a", soon()).await.unwrap();
        let _a2 = slots.acquire("a", soon()).await.unwrap();
        // a queues first, b second; b holds nothing, so b goes first.
        let waiting_a = tokio::spawn({
            let slots = slots.clone();
            async move {
                slots
                    .acquire("a", soon())
                    .await
                    .map(|s| (Instant::now(), s))
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiting_b = tokio::spawn({
            let slots = slots.clone();
            async move {
                slots
                    .acquire("b", soon())
                    .await
                    .map(|s| (Instant::now(), s))
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a1);
        let (_, b) = waiting_b.await.unwrap().unwrap();
        assert!(!waiting_a.is_finished(), "a got the slot before b");
        drop(b);
        let (_, _a) = waiting_a.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_a_slot() {
        let slots = FairSlots::new(1, 1, ROOMY);
        let held = slots.acquire("a", soon()).await.unwrap();
        let gave_up = slots
            .acquire("b", Instant::now() + Duration::from_millis(20))
            .await;
        assert!(gave_up.is_err());
        drop(held);
        assert_eq!(slots.held("b"), (0, 0));
        let _again = slots.acquire("b", soon()).await.unwrap();
    }

    #[tokio::test]
    async fn many_waiters_all_finish_and_the_count_returns_to_zero() {
        let slots = FairSlots::new(3, 2, ROOMY);
        let tasks: Vec<_> = (0..60)
            .map(|i| {
                let slots = slots.clone();
                tokio::spawn(async move {
                    let org = ["a", "b", "c"][i % 3];
                    let slot = slots.acquire(org, soon()).await.unwrap();
                    let (held, own) = slots.held(org);
                    assert!(held <= 3 && own <= 2, "{held} {own}");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    drop(slot);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(slots.held("a"), (0, 0));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_per_organization() {
        let slots = FairSlots::new(
            1,
            1,
            QueueLimits {
                total: 3,
                per_organization: 2,
            },
        );
        let running = slots.acquire("a", soon()).await.unwrap();
        let wait = |org: &'static str| {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire(org, soon()).await })
        };
        let a1 = wait("a");
        let a2 = wait("a");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(slots.waiting("a"), (2, 2));
        // a's share of the queue is full; b still finds room.
        let started = Instant::now();
        assert_eq!(
            slots.acquire("a", soon()).await.unwrap_err(),
            NoSlot::QueueFull
        );
        assert!(started.elapsed() < Duration::from_millis(100));
        let b1 = wait("b");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(slots.waiting("b"), (3, 1));
        // Now the whole queue is full.
        assert_eq!(
            slots.acquire("c", soon()).await.unwrap_err(),
            NoSlot::QueueFull
        );
        // Every organization now holds none: the slot goes round in
        // arrival order.
        drop(running);
        for waiter in [a1, a2, b1] {
            drop(waiter.await.unwrap().unwrap());
        }
        assert_eq!(slots.waiting("a"), (0, 0));
        assert_eq!(slots.held("a"), (0, 0));
    }

    #[tokio::test]
    async fn waiters_that_gave_up_leave_room_in_the_queue() {
        let slots = FairSlots::new(
            1,
            1,
            QueueLimits {
                total: 1,
                per_organization: 1,
            },
        );
        let _running = slots.acquire("a", soon()).await.unwrap();
        for _ in 0..3 {
            let gave_up = slots
                .acquire("b", Instant::now() + Duration::from_millis(10))
                .await;
            assert_eq!(gave_up.unwrap_err(), NoSlot::TimedOut);
        }
        assert_eq!(slots.waiting("b"), (0, 0));
    }
}

//! Plans made for GetFlightInfo, handed to the DoGets of their tickets, so that a flight is
//! planned once on the server that issued it rather than once more per endpoint.
//!
//! Tickets stay self-contained: a miss (another server, a restart, an expired entry, a ticket
//! fetched a second time) plans again from the ticket. An entry is taken once, so no partition of
//! a cached plan is ever executed twice (a repartitioning operator's state is consumed by its
//! first run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::query::Planned;

/// How long a plan waits for its DoGet; clients fetch right after GetFlightInfo.
const KEEP: Duration = Duration::from_secs(30);

/// How many tickets' plans are kept at most; the oldest go first.
const MAX_TICKETS: usize = 1024;

/// How many distinct plans are kept at most: a plan can hold a selection's row positions and
/// names, so a client that asks for flights and never fetches them pins at most this many.
const MAX_PLANS: usize = 32;

#[derive(Default)]
pub(super) struct Plans {
    entries: Mutex<HashMap<Bytes, Slot>>,
}

struct Slot {
    made: Instant,
    planned: Arc<Planned>,
    partition: usize,
}

impl Plans {
    /// Keeps `planned` for the tickets of its endpoints, in partition order.
    pub(super) fn offer(&self, planned: Arc<Planned>, tickets: impl IntoIterator<Item = Bytes>) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, e| now.duration_since(e.made) < KEEP);
        // Room for one more plan: the oldest plans go whole, with all their tickets.
        loop {
            let mut plans: Vec<(Instant, *const Planned)> = entries
                .values()
                .map(|e| (e.made, Arc::as_ptr(&e.planned)))
                .collect();
            plans.sort_unstable();
            plans.dedup_by_key(|p| p.1);
            if plans.len() < MAX_PLANS {
                break;
            }
            let oldest = plans[0].1;
            entries.retain(|_, e| Arc::as_ptr(&e.planned) != oldest);
        }
        for (partition, ticket) in tickets.into_iter().enumerate() {
            if entries.len() >= MAX_TICKETS
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.made)
                    .map(|(t, _)| t.clone())
            {
                entries.remove(&oldest);
            }
            let planned = Arc::clone(&planned);
            entries.insert(
                ticket,
                Slot {
                    made: now,
                    planned,
                    partition,
                },
            );
        }
    }

    /// The plan and partition of `ticket`, if this server planned it moments ago.
    pub(super) fn take(&self, ticket: &[u8]) -> Option<(Arc<Planned>, usize)> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.remove(ticket);
        // Expired plans go now too, not only when the next flight is planned: a plan whose
        // other endpoints are never fetched must not outlive its keep.
        let now = Instant::now();
        entries.retain(|_, e| now.duration_since(e.made) < KEEP);
        let entry = entry?;
        (now.duration_since(entry.made) < KEEP).then_some((entry.planned, entry.partition))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::Schema;
    use bytes::Bytes;
    use datafusion::execution::TaskContext;
    use datafusion::physical_plan::empty::EmptyExec;

    use super::{MAX_PLANS, MAX_TICKETS, Plans};
    use crate::query::Planned;

    fn planned() -> Arc<Planned> {
        Arc::new(Planned {
            plan: Arc::new(EmptyExec::new(Arc::new(Schema::empty()))),
            task: Arc::new(TaskContext::default()),
            limit: None,
        })
    }

    fn tickets(prefix: &str, n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!("{prefix}{i}")))
            .collect()
    }

    #[test]
    fn each_ticket_takes_its_partition_once() {
        let plans = Plans::default();
        let plan = planned();
        plans.offer(Arc::clone(&plan), tickets("a", 3));
        for (partition, ticket) in tickets("a", 3).iter().enumerate().rev() {
            let (got, at) = plans.take(ticket).expect("offered moments ago");
            assert!(Arc::ptr_eq(&got, &plan));
            assert_eq!(at, partition);
            // A second fetch of the same ticket plans again from the ticket.
            assert!(plans.take(ticket).is_none());
        }
        assert!(plans.take(b"never offered").is_none());
    }

    #[test]
    fn the_oldest_plans_go_whole_when_too_many_wait() {
        let plans = Plans::default();
        for p in 0..=MAX_PLANS {
            plans.offer(planned(), tickets(&format!("p{p}-"), 2));
        }
        // The first plan made room for the last, with both its tickets.
        assert!(plans.take(b"p0-0").is_none());
        assert!(plans.take(b"p0-1").is_none());
        assert!(plans.take(b"p1-0").is_some());
        assert!(
            plans
                .take(&format!("p{MAX_PLANS}-1").into_bytes())
                .is_some()
        );
    }

    #[test]
    fn one_huge_flight_keeps_at_most_the_ticket_bound() {
        let plans = Plans::default();
        plans.offer(planned(), tickets("t", MAX_TICKETS + 10));
        let kept = tickets("t", MAX_TICKETS + 10)
            .iter()
            .filter(|t| plans.take(t).is_some())
            .count();
        assert_eq!(kept, MAX_TICKETS);
    }
}

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
    entries: Mutex<HashMap<Bytes, Entry>>,
}

struct Entry {
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
                Entry {
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

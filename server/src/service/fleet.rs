//! A fleet of servers on one catalog: each renews a heartbeat there, and GetFlightInfo names, for
//! each endpoint, the live server that rendezvous hashing picks for the data it reads. The same
//! shard then goes to the same server, whose page and range caches stay warm; a server that stops
//! renewing drops out of the choice within the heartbeat window. Tickets are portable, so a
//! location is advice: any server serves any ticket.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::catalog::Catalog;

/// This server's place in a fleet.
pub struct Fleet {
    /// Where clients and other servers reach this server.
    advertise: String,
    /// The live servers (this one included), as last read from the catalog, sorted.
    live: RwLock<Arc<Vec<String>>>,
}

impl Fleet {
    /// A fleet member reachable at `advertise`, alone until its first heartbeat is read back.
    pub fn new(advertise: impl Into<String>) -> Arc<Self> {
        let advertise = advertise.into();
        Arc::new(Self {
            live: RwLock::new(Arc::new(vec![advertise.clone()])),
            advertise,
        })
    }

    /// The address this server advertises.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The live servers, this one included.
    pub fn live(&self) -> Arc<Vec<String>> {
        match self.live.read() {
            Ok(live) => Arc::clone(&live),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// The server that should serve the data named by `key`, or `None` when this server is the
    /// whole fleet (endpoints then carry no location, as a single server's always did).
    pub fn route(&self, key: &[u8]) -> Option<String> {
        let live = self.live();
        if live.len() < 2 {
            return None;
        }
        live.iter().max_by_key(|uri| score(uri, key)).cloned()
    }

    /// Renews this server's heartbeat every `interval` and reads back the servers seen within
    /// five intervals, until `stop` resolves; then leaves the fleet. A catalog error is logged
    /// and the last known membership kept: routing is advice, never a reason to fail a request.
    pub async fn run(
        self: Arc<Self>,
        catalog: Catalog,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let window = interval.saturating_mul(5);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        // A catalog that refuses writes (a read-only data dir) is said once, not every beat.
        let mut failing = false;
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = ticks.tick() => {}
            }
            let seen = match catalog.heartbeat(&self.advertise).await {
                Ok(()) => catalog.live_servers(window).await,
                Err(e) => Err(e),
            };
            match seen {
                Ok(mut live) => {
                    failing = false;
                    if !live.contains(&self.advertise) {
                        live.push(self.advertise.clone());
                        live.sort();
                    }
                    if let Ok(mut slot) = self.live.write() {
                        *slot = Arc::new(live);
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e.chain(), "fleet heartbeat failed (said once until it works)");
                }
                Err(e) => tracing::debug!(error = %e.chain(), "fleet heartbeat failed"),
            }
        }
        if let Err(e) = catalog.leave(&self.advertise).await {
            tracing::warn!(error = %e.chain(), "leaving the fleet failed");
        }
    }
}

/// What an endpoint reads, as the key routing hashes: the artifact versions, the element and the
/// partition. Not the ticket, which is new for every request: the same shard must go to the same
/// server however often it is asked for.
pub(super) fn shard_key(
    uids: &[String],
    element: &[String],
    partition: usize,
    partition_count: usize,
) -> Vec<u8> {
    format!(
        "{}\0{}\0{partition}/{partition_count}",
        uids.join(","),
        element.join("/")
    )
    .into_bytes()
}

/// `endpoint` with the location of the fleet's server for `shard`, if the fleet has several.
pub(super) fn locate(
    fleet: Option<&Fleet>,
    endpoint: arrow_flight::FlightEndpoint,
    shard: &[u8],
) -> arrow_flight::FlightEndpoint {
    match fleet.and_then(|f| f.route(shard)) {
        Some(uri) => endpoint.with_location(uri),
        None => endpoint,
    }
}

/// Rendezvous (highest random weight) score of `server` for `key`: each key goes to the server
/// with the highest score, so removing a server moves only the keys it had.
fn score(server: &str, key: &[u8]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(server.as_bytes());
    hasher.update(&[0]);
    hasher.update(key);
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet_of(servers: &[&str]) -> Arc<Fleet> {
        let fleet = Fleet::new(servers[0]);
        *fleet.live.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(servers.iter().map(|s| s.to_string()).collect());
        fleet
    }

    #[test]
    fn one_server_routes_nothing() {
        assert_eq!(Fleet::new("grpc://a:1").route(b"shard"), None);
    }

    #[test]
    fn keys_spread_and_only_a_lost_servers_keys_move() {
        let three = fleet_of(&["grpc://a:1", "grpc://b:1", "grpc://c:1"]);
        let two = fleet_of(&["grpc://a:1", "grpc://b:1"]);
        let keys: Vec<Vec<u8>> = (0..300)
            .map(|i| format!("shard-{i}").into_bytes())
            .collect();
        let mut counts = std::collections::HashMap::new();
        for key in &keys {
            let before = three.route(key);
            *counts.entry(before.clone()).or_insert(0) += 1;
            let after = two.route(key);
            if before.as_deref() != Some("grpc://c:1") {
                assert_eq!(before, after, "a key on a surviving server must stay there");
            }
            assert_eq!(three.route(key), before, "routing is deterministic");
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n > 60), "{counts:?}");
    }
}

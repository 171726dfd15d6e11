//! Prometheus metrics: what a fleet's operator watches. Counters live where the work happens
//! (the edge counts calls, the stream guard rows and bytes, the governor queue waits) and are
//! rendered in the text exposition format on `--metrics-addr` at `/metrics`.
//!
//! The endpoint is plain HTTP/1 answered by hand: a scrape is one small GET, and a read bounded
//! in size and time keeps a slow or hostile peer from holding anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::query::Planner;

/// The longest request head read from a scraper, and how long it may take to send it.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The server's counters.
#[derive(Default)]
pub struct Metrics {
    /// Calls by RPC (`DoGet`, `GetFlightInfo`, ...), counted as they arrive.
    calls: Mutex<BTreeMap<String, u64>>,
    rows_sent: AtomicU64,
    bytes_sent: AtomicU64,
    streams_open: AtomicI64,
    streams_started: AtomicU64,
    queue_waits: AtomicU64,
    queue_wait_micros: AtomicU64,
    queue_refusals: AtomicU64,
}

impl Metrics {
    /// A call to the RPC at gRPC path `path` (`/arrow.flight.protocol.FlightService/DoGet`).
    pub(super) fn call(&self, path: &str) {
        let rpc = path.rsplit('/').next().unwrap_or(path);
        // Unknown paths are counted under one name, so that a scanner cannot grow the map.
        let rpc = if rpc.len() <= 64 && rpc.chars().all(|c| c.is_ascii_alphanumeric()) {
            rpc
        } else {
            "other"
        };
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if calls.len() < 64 || calls.contains_key(rpc) {
            *calls.entry(rpc.to_string()).or_default() += 1;
        }
    }

    pub(super) fn sent(&self, rows: u64, bytes: u64) {
        self.rows_sent.fetch_add(rows, Relaxed);
        self.bytes_sent.fetch_add(bytes, Relaxed);
    }

    pub(super) fn stream_started(&self) {
        self.streams_started.fetch_add(1, Relaxed);
        self.streams_open.fetch_add(1, Relaxed);
    }

    pub(super) fn stream_ended(&self) {
        self.streams_open.fetch_sub(1, Relaxed);
    }

    /// A DoGet that waited `waited` for a stream slot; `admitted` false if it was refused.
    pub(super) fn queued(&self, waited: Duration, admitted: bool) {
        self.queue_waits.fetch_add(1, Relaxed);
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.queue_wait_micros.fetch_add(micros, Relaxed);
        if !admitted {
            self.queue_refusals.fetch_add(1, Relaxed);
        }
    }

    /// Every metric in Prometheus' text format.
    pub fn render(&self, planner: &Planner) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, values: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in values {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let calls: Vec<(String, f64)> = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(rpc, n)| (format!("{{rpc=\"{rpc}\"}}"), *n as f64))
            .collect();
        metric(
            "artiflight_calls_total",
            "counter",
            "Calls received, by RPC.",
            &calls,
        );
        let mut single = vec![
            (
                "artiflight_rows_sent_total",
                "counter",
                "Rows sent in DoGet streams.",
                self.rows_sent.load(Relaxed) as f64,
            ),
            (
                "artiflight_bytes_sent_total",
                "counter",
                "Arrow IPC body bytes sent in DoGet streams.",
                self.bytes_sent.load(Relaxed) as f64,
            ),
            (
                "artiflight_streams_open",
                "gauge",
                "DoGet streams running now.",
                self.streams_open.load(Relaxed) as f64,
            ),
            (
                "artiflight_streams_started_total",
                "counter",
                "DoGet streams started.",
                self.streams_started.load(Relaxed) as f64,
            ),
            (
                "artiflight_queue_waits_total",
                "counter",
                "DoGets that asked for a stream slot (--max-streams).",
                self.queue_waits.load(Relaxed) as f64,
            ),
            (
                "artiflight_queue_wait_seconds_total",
                "counter",
                "Time DoGets spent waiting for a stream slot.",
                self.queue_wait_micros.load(Relaxed) as f64 / 1e6,
            ),
            (
                "artiflight_queue_refusals_total",
                "counter",
                "DoGets refused after --queue-timeout.",
                self.queue_refusals.load(Relaxed) as f64,
            ),
            (
                "artiflight_query_memory_bytes",
                "gauge",
                "Query memory reserved now (--max-query-memory is the bound).",
                planner.memory_reserved() as f64,
            ),
        ];
        if let Some((hits, misses, held)) = planner.storage().cache_counts() {
            single.extend([
                (
                    "artiflight_range_cache_hits_total",
                    "counter",
                    "Remote reads served from the range cache.",
                    hits as f64,
                ),
                (
                    "artiflight_range_cache_misses_total",
                    "counter",
                    "Remote reads that went to the store.",
                    misses as f64,
                ),
                (
                    "artiflight_range_cache_bytes",
                    "gauge",
                    "Bytes held by the range cache (--cache-size is the bound).",
                    held as f64,
                ),
            ]);
        }
        for (name, kind, help, value) in single {
            metric(name, kind, help, &[(String::new(), value)]);
        }
        out
    }
}

/// Answers `GET /metrics` on `listener` until the task is dropped; anything else is 404.
pub(super) async fn serve_metrics(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    planner: Planner,
) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let metrics = std::sync::Arc::clone(&metrics);
        let planner = planner.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
                ("200 OK", metrics.render(&planner))
            } else {
                (
                    "404 Not Found",
                    "only /metrics is served here\n".to_string(),
                )
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(REQUEST_TIMEOUT, socket.write_all(answer.as_bytes())).await;
        });
    }
}

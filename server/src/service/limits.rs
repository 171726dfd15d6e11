//! What one client may take from the server: concurrent streams, rows and bytes per stream, time
//! per request; and how streams end when the server shuts down.
//!
//! A DoGet holds its stream permit inside the stream it returns, so the permit is freed the moment
//! the stream ends or its client goes away, whichever comes first.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow_flight::FlightData;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tonic::Status;

use super::metrics::Metrics;
use super::stream::FlightStream;
use crate::error::{Error, Result};

/// The server's limits (docs/PROTOCOL.md section 9). `None` means unlimited.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent DoGet streams; further DoGets wait up to `queue_timeout`.
    pub max_streams: Option<usize>,
    /// How long a DoGet waits for a stream permit before RESOURCE_EXHAUSTED.
    pub queue_timeout: Duration,
    /// Largest gRPC message a client may send (DoPut batches) or receive.
    pub max_message_bytes: usize,
    /// Rows one DoGet stream may send.
    pub max_rows: Option<u64>,
    /// Bytes of Arrow data one DoGet stream may send.
    pub max_bytes: Option<u64>,
    /// Time to answer a call, or to start a DoGet stream (uploads are bounded by the client).
    pub request_timeout: Option<Duration>,
    /// After SIGTERM, how long running streams may go on before they are ended.
    pub shutdown_grace: Duration,
    /// How long one DoGet stream (a plan's endpoint or a SQL statement's) may run.
    pub max_query_time: Option<Duration>,
    /// How long a DoGet's client may take nothing before the stream is ended and its slot freed.
    pub stall_timeout: Option<Duration>,
    /// Concurrent HTTP/2 streams (calls) on one connection.
    pub max_connection_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams: Some(128),
            queue_timeout: Duration::from_secs(30),
            max_message_bytes: 256 * 1024 * 1024,
            max_rows: None,
            max_bytes: None,
            request_timeout: Some(Duration::from_secs(300)),
            shutdown_grace: Duration::from_secs(10),
            max_query_time: None,
            stall_timeout: Some(Duration::from_secs(60)),
            max_connection_streams: 100,
        }
    }
}

/// Parses a duration such as `500ms`, `1s`, `2m` or `1h` (a bare number is seconds).
///
/// ```
/// use std::time::{Duration, Instant};
/// use artiflight_server::service::parse_duration;
/// assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
/// assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        Error::invalid(format!(
            "invalid duration '{text}': expected e.g. 1s, 500ms"
        ))
    })?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(Error::invalid(format!(
                "invalid duration unit '{other}' in '{text}': use ms, s, m or h"
            )));
        }
    };
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| Error::invalid(format!("invalid duration '{text}'")))
}

/// The limits in force, the stream permits and the shutdown signal, shared by every call.
pub(super) struct Governor {
    pub(super) limits: Limits,
    /// Streams, rows, bytes and queue waits, for `--metrics-addr`.
    pub(super) metrics: Arc<Metrics>,
    streams: Option<Arc<Semaphore>>,
    /// When the shutdown began, once it has.
    stopping: watch::Sender<Option<Instant>>,
}

impl Governor {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            streams: limits
                .max_streams
                .map(|n| Arc::new(Semaphore::new(n.max(1)))),
            limits,
            metrics: Arc::default(),
            stopping: watch::channel(None).0,
        }
    }

    /// Waits for a stream permit, up to the queue timeout. Once the server is shutting down no
    /// stream starts, and those waiting are told so at once.
    pub(super) async fn admit(&self) -> Result<Option<OwnedSemaphorePermit>> {
        let shutting_down = || Error::Unavailable("the server is shutting down".into());
        if self.stopping.borrow().is_some() {
            return Err(shutting_down());
        }
        let Some(streams) = &self.streams else {
            return Ok(None);
        };
        let asked = Instant::now();
        let waited = tokio::time::timeout(
            self.limits.queue_timeout,
            Arc::clone(streams).acquire_owned(),
        )
        .await;
        self.metrics
            .queued(asked.elapsed(), matches!(waited, Ok(Ok(_))));
        match waited {
            Ok(Ok(permit)) => Ok(Some(permit)),
            // The semaphore is closed by `stop`.
            Ok(Err(_)) => Err(shutting_down()),
            Err(_) => Err(Error::ResourceExhausted(format!(
                "{} streams are running, the server's limit (--max-streams); none ended within \
                 {:?} (--queue-timeout): try again later",
                self.limits.max_streams.unwrap_or_default(),
                self.limits.queue_timeout
            ))),
        }
    }

    /// Runs `call` within the request timeout.
    pub(super) async fn deadline<T, E: From<Error>>(
        &self,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        match self.limits.request_timeout {
            None => call.await,
            Some(limit) => tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                Err(Error::Timeout(format!(
                    "the request took longer than the server allows ({limit:?}, --request-timeout)"
                ))
                .into())
            }),
        }
    }

    /// Starts the shutdown: running streams get the grace period, then end; no stream starts.
    pub(super) fn stop(&self) {
        self.stopping.send_if_modified(|at| {
            let first = at.is_none();
            at.get_or_insert_with(Instant::now);
            first
        });
        if let Some(streams) = &self.streams {
            streams.close();
        }
    }

    /// Resolves when the grace period that began with [`Governor::stop`] is over, however late
    /// it is asked.
    fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        let grace = self.limits.shutdown_grace;
        async move {
            let began = match stopping.wait_for(Option::is_some).await {
                Ok(at) => *at,
                Err(_) => None,
            };
            match began {
                // An absurd grace that overflows the clock means waiting for ever.
                Some(at) => match at.checked_add(grace) {
                    Some(end) => tokio::time::sleep_until(end.into()).await,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        }
    }

    /// Resolves once the grace period after a stop is over, and a little more: by then every
    /// stream has ended, and a connection still open is not worth waiting for.
    pub(super) fn hard_stop(&self) -> impl Future<Output = ()> + Send + 'static {
        let ended = self.ended();
        async move {
            ended.await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Wraps a DoGet stream: it holds `permit`, counts rows and bytes against the limits, ends
    /// with DEADLINE_EXCEEDED past `--max-query-time`, with UNAVAILABLE when the shutdown grace
    /// is over, and is ended (its permit freed) when its client takes nothing for
    /// `--stall-timeout`.
    pub(super) fn guard(
        &self,
        stream: FlightStream<FlightData>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> FlightStream<FlightData> {
        let shared = Arc::new(Mutex::new(Shared {
            stream: Some(stream),
            permit,
            stalled: false,
        }));
        let mark = Arc::new(WakeMark::default());
        self.metrics.stream_started();
        let watchdog = self.limits.stall_timeout.map(|stall| {
            tokio::spawn(watch_stall(
                Arc::downgrade(&shared),
                Arc::clone(&mark),
                stall,
            ))
        });
        Box::pin(Guarded {
            shared,
            mark,
            ended: self.ended().boxed(),
            deadline: self
                .limits
                .max_query_time
                .map(|limit| (limit, Box::pin(tokio::time::sleep(limit)))),
            watchdog,
            max_rows: self.limits.max_rows,
            max_bytes: self.limits.max_bytes,
            rows: 0,
            bytes: 0,
            metrics: Arc::clone(&self.metrics),
        })
    }
}

/// What a guarded stream shares with its stall watchdog.
struct Shared {
    /// `None` once ended: the scan is dropped at once.
    stream: Option<FlightStream<FlightData>>,
    permit: Option<OwnedSemaphorePermit>,
    stalled: bool,
}

/// Since when a message has been waiting for a client that has not asked for it: one handed
/// over, or one the scan woke up with. A client that stops reading stops asking (HTTP/2 flow
/// control), so nothing polls the stream again; the scan's wake-ups go through
/// [`MarkingWaker`] so that a message it finishes meanwhile counts too. Cleared by every poll.
#[derive(Default)]
struct WakeMark(Mutex<Option<Instant>>);

impl WakeMark {
    fn get(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Wakes the guarded stream's task and marks when.
struct MarkingWaker {
    mark: Arc<WakeMark>,
    inner: std::task::Waker,
}

impl futures::task::ArcWake for MarkingWaker {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.mark.get().get_or_insert_with(Instant::now);
        arc_self.inner.wake_by_ref();
    }
}

/// Ends a stream whose client took nothing for `stall`: a client that stops reading stops asking
/// for messages (HTTP/2 flow control), so nothing polls the stream that could notice it. The
/// scan and the stream permit are dropped here; the client, if it ever reads again, is told why.
async fn watch_stall(shared: std::sync::Weak<Mutex<Shared>>, mark: Arc<WakeMark>, stall: Duration) {
    let tick = (stall / 4).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
        if state.stream.is_none() {
            return;
        }
        if mark.get().is_some_and(|at| at.elapsed() >= stall) {
            tracing::warn!(
                ?stall,
                "a client took nothing for --stall-timeout: stream ended"
            );
            state.stream = None;
            state.permit = None;
            state.stalled = true;
            return;
        }
    }
}

struct Guarded {
    shared: Arc<Mutex<Shared>>,
    mark: Arc<WakeMark>,
    ended: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// `--max-query-time` and the timer that ends the stream then.
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    max_rows: Option<u64>,
    max_bytes: Option<u64>,
    rows: u64,
    bytes: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
        self.metrics.stream_ended();
    }
}

impl Guarded {
    fn end(&mut self, status: Status) -> Poll<Option<Result<FlightData, Status>>> {
        let mut state = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        state.stream = None;
        state.permit = None;
        Poll::Ready(Some(Err(status)))
    }
}

/// Rows in a FlightData message: its IPC header says, without decoding the body.
fn rows_of(data: &FlightData) -> u64 {
    arrow::ipc::root_as_message(&data.data_header)
        .ok()
        .and_then(|m| m.header_as_record_batch())
        .map_or(0, |b| u64::try_from(b.length()).unwrap_or(0))
}

impl Stream for Guarded {
    type Item = Result<FlightData, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        *self.mark.get() = None;
        let (stalled, done) = {
            let mut state = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut state.stalled), state.stream.is_none())
        };
        if stalled {
            return Poll::Ready(Some(Err(Status::deadline_exceeded(
                "this stream was ended: its client took nothing for the server's --stall-timeout",
            ))));
        }
        if done {
            return Poll::Ready(None);
        }
        if self.ended.poll_unpin(cx).is_ready() {
            return self.end(Status::unavailable(
                "the server is shutting down; ask for this endpoint again",
            ));
        }
        if let Some((limit, timer)) = self.deadline.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            let limit = *limit;
            return self.end(Status::deadline_exceeded(format!(
                "this stream ran longer than the server allows ({limit:?}, --max-query-time): \
                 narrow it with a filter, columns or a limit"
            )));
        }
        let waker = futures::task::waker(Arc::new(MarkingWaker {
            mark: Arc::clone(&self.mark),
            inner: cx.waker().clone(),
        }));
        let mut marked = Context::from_waker(&waker);
        let item = {
            let mut state = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let Some(stream) = state.stream.as_mut() else {
                return Poll::Ready(None);
            };
            match stream.poll_next_unpin(&mut marked) {
                Poll::Ready(Some(Ok(data))) => {
                    *self.mark.get() = Some(Instant::now());
                    data
                }
                Poll::Ready(None) => {
                    state.stream = None;
                    state.permit = None;
                    return Poll::Ready(None);
                }
                other => return other,
            }
        };
        let (rows, bytes) = (rows_of(&item), item.data_body.len() as u64);
        self.rows += rows;
        self.bytes += bytes;
        self.metrics.sent(rows, bytes);
        if let Some(max) = self.max_rows
            && self.rows > max
        {
            return self.end(Status::resource_exhausted(format!(
                "this stream passed the server's limit of {max} rows per request (--max-rows): \
                 narrow it with a filter, columns or a limit"
            )));
        }
        if let Some(max) = self.max_bytes
            && self.bytes > max
        {
            return self.end(Status::resource_exhausted(format!(
                "this stream passed the server's limit of {max} bytes per request (--max-bytes): \
                 narrow it with a filter, columns or a limit"
            )));
        }
        Poll::Ready(Some(Ok(item)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow::array::{Int32Array, RecordBatch};
    use arrow_flight::FlightData;
    use futures::{StreamExt, TryStreamExt, stream};
    use tonic::Code;

    use super::{Governor, Limits, parse_duration};
    use crate::error::Error;
    use crate::service::stream::{FlightStream, batches_to_flight};

    fn limits() -> Limits {
        Limits {
            max_streams: None,
            queue_timeout: Duration::from_millis(50),
            stall_timeout: None,
            ..Limits::default()
        }
    }

    /// A schema message, then `batches` batches of `rows` rows each.
    fn messages(batches: usize, rows: i32) -> FlightStream<FlightData> {
        let batch = RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int32Array::from_iter_values(0..rows)) as _,
        )])
        .expect("a batch");
        let schema = batch.schema();
        batches_to_flight(
            schema,
            stream::iter(std::iter::repeat_n(batch, batches).map(Ok)).boxed(),
        )
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("90").ok(), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 2m ").ok(), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_duration("1.5s").ok(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_duration("1h").ok(), Some(Duration::from_secs(3600)));
        for bad in ["", "s", "5 days", "-1s", "1e400s"] {
            assert!(
                matches!(parse_duration(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_full_server_queues_then_refuses() {
        let governor = Governor::new(Limits {
            max_streams: Some(1),
            ..limits()
        });
        let first = governor.admit().await.expect("a free slot");
        let refused = governor.admit().await.expect_err("the slot is taken");
        assert!(matches!(refused, Error::ResourceExhausted(_)), "{refused}");
        drop(first);
        assert!(governor.admit().await.is_ok(), "the slot came back");
        governor.stop();
        let stopping = governor.admit().await.expect_err("shutting down");
        assert!(matches!(stopping, Error::Unavailable(_)), "{stopping}");
    }

    #[tokio::test]
    async fn a_stream_past_its_row_limit_ends_with_resource_exhausted() {
        let governor = Governor::new(Limits {
            max_rows: Some(5),
            ..limits()
        });
        let mut guarded = governor.guard(messages(3, 3), None);
        let mut sent = 0;
        let error = loop {
            match guarded.next().await {
                Some(Ok(_)) => sent += 1,
                Some(Err(status)) => break status,
                None => panic!("the stream ended within its limit"),
            }
        };
        // The schema and the first batch (3 rows); the second batch passes 5.
        assert_eq!(sent, 2);
        assert_eq!(error.code(), Code::ResourceExhausted);
        assert!(guarded.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_within_its_limits_passes_unchanged() {
        let governor = Governor::new(Limits {
            max_rows: Some(9),
            max_bytes: Some(1 << 20),
            ..limits()
        });
        let sent: Vec<FlightData> = governor
            .guard(messages(3, 3), None)
            .try_collect()
            .await
            .expect("within limits");
        assert_eq!(sent.len(), 4);
    }

    #[tokio::test]
    async fn a_client_that_takes_nothing_loses_its_stream_and_slot() {
        let governor = Governor::new(Limits {
            max_streams: Some(1),
            stall_timeout: Some(Duration::from_millis(100)),
            // Longer than the stall: the second DoGet waits for the stalled one's slot.
            queue_timeout: Duration::from_secs(5),
            ..limits()
        });
        let permit = governor.admit().await.expect("a slot");
        let mut guarded = governor.guard(messages(100, 10), permit);
        assert!(matches!(guarded.next().await, Some(Ok(_))));
        // The client stops reading; the watchdog checks on its own timer.
        let freed = governor.admit().await;
        assert!(
            matches!(freed, Ok(Some(_))),
            "the stalled stream's slot is freed"
        );
        let ended = guarded.next().await.expect("an item").expect_err("ended");
        assert_eq!(ended.code(), Code::DeadlineExceeded);
    }
}

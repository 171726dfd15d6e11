//! Cancelling flights. `CancelFlightInfo` (and Flight SQL's older `CancelQuery`) end the running
//! streams of the flight's tickets with CANCELLED, which drops their scans, and refuse those
//! tickets from then on.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use arrow_flight::FlightData;
use bytes::Bytes;
use futures::channel::oneshot;
use futures::{FutureExt, Stream, StreamExt};
use tonic::Status;

use super::stream::FlightStream;

/// How many cancelled tickets are remembered, so that a DoGet arriving after the cancel is refused.
const REMEMBERED: usize = 4096;

/// The running DoGet streams by ticket, and recently cancelled tickets.
#[derive(Default)]
pub(super) struct Cancels {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    running: HashMap<u64, (Bytes, oneshot::Sender<()>)>,
    /// Oldest first, with a set to look them up in constant time.
    cancelled: VecDeque<Bytes>,
    cancelled_set: std::collections::HashSet<Bytes>,
}

impl Cancels {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps the stream of `ticket` so that a cancel ends it; refuses a cancelled ticket.
    pub(super) fn track(
        self: &Arc<Self>,
        ticket: Bytes,
        stream: FlightStream<FlightData>,
    ) -> Result<FlightStream<FlightData>, Status> {
        let mut inner = self.lock();
        if inner.cancelled_set.contains(&ticket) {
            return Err(Status::cancelled("this flight was cancelled"));
        }
        let (sender, cancelled) = oneshot::channel();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.running.insert(id, (ticket, sender));
        Ok(Box::pin(Cancellable {
            stream: Some(stream),
            cancelled,
            _running: Running {
                cancels: Arc::clone(self),
                id,
            },
        }))
    }

    /// Cancels the flight whose endpoints carry `tickets`; returns how many streams were running.
    ///
    /// The lock is held for one pass over the running streams, whatever the number of tickets
    /// (at most [`REMEMBERED`] of them count; a flight has no more endpoints than that).
    pub(super) fn cancel(&self, tickets: impl IntoIterator<Item = Bytes>) -> usize {
        let tickets: std::collections::HashSet<Bytes> =
            tickets.into_iter().take(REMEMBERED).collect();
        let mut inner = self.lock();
        let ids: Vec<u64> = inner
            .running
            .iter()
            .filter(|(_, (t, _))| tickets.contains(t))
            .map(|(id, _)| *id)
            .collect();
        let mut stopped = 0;
        for id in ids {
            if let Some((_, sender)) = inner.running.remove(&id) {
                stopped += usize::from(sender.send(()).is_ok());
            }
        }
        for ticket in tickets {
            if inner.cancelled_set.insert(ticket.clone()) {
                if inner.cancelled.len() == REMEMBERED
                    && let Some(oldest) = inner.cancelled.pop_front()
                {
                    inner.cancelled_set.remove(&oldest);
                }
                inner.cancelled.push_back(ticket);
            }
        }
        stopped
    }
}

/// Removes a stream from the running set when it ends or its client goes.
struct Running {
    cancels: Arc<Cancels>,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancels.lock().running.remove(&self.id);
    }
}

struct Cancellable {
    /// `None` once cancelled: the scan is dropped at once, not when the client reads on.
    stream: Option<FlightStream<FlightData>>,
    cancelled: oneshot::Receiver<()>,
    _running: Running,
}

impl Stream for Cancellable {
    type Item = Result<FlightData, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The cancel is looked at first: a scan that is always ready would otherwise never see it.
        if self.stream.is_some() && matches!(self.cancelled.poll_unpin(cx), Poll::Ready(Ok(()))) {
            self.stream = None;
            return Poll::Ready(Some(Err(Status::cancelled("the flight was cancelled"))));
        }
        match self.stream.as_mut() {
            Some(stream) => stream.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_flight::FlightData;
    use bytes::Bytes;
    use futures::{StreamExt, stream};
    use tonic::Code;

    use super::Cancels;
    use crate::service::stream::FlightStream;

    /// A scan that never ends on its own.
    fn endless() -> FlightStream<FlightData> {
        Box::pin(stream::pending())
    }

    #[tokio::test]
    async fn a_cancel_ends_the_running_stream_and_refuses_its_ticket() {
        let cancels = Arc::new(Cancels::default());
        let ticket = Bytes::from_static(b"t1");
        let mut running = cancels
            .track(ticket.clone(), endless())
            .expect("not cancelled yet");
        let other = cancels
            .track(Bytes::from_static(b"t2"), endless())
            .expect("not cancelled");
        assert_eq!(cancels.cancel([ticket.clone()]), 1);
        let ended = running
            .next()
            .await
            .expect("an item")
            .expect_err("cancelled");
        assert_eq!(ended.code(), Code::Cancelled);
        assert!(running.next().await.is_none());
        // A DoGet of the cancelled ticket that arrives later is refused; others are untouched.
        let refused = cancels.track(ticket, endless()).err().expect("refused");
        assert_eq!(refused.code(), Code::Cancelled);
        drop(other);
        assert_eq!(
            cancels.cancel([Bytes::from_static(b"t2")]),
            0,
            "it had ended"
        );
    }

    #[tokio::test]
    async fn a_finished_stream_leaves_nothing_behind() {
        let cancels = Arc::new(Cancels::default());
        let done: FlightStream<FlightData> = Box::pin(stream::iter([Ok(FlightData::default())]));
        let mut tracked = cancels
            .track(Bytes::from_static(b"t"), done)
            .expect("tracked");
        assert!(tracked.next().await.is_some());
        assert!(tracked.next().await.is_none());
        drop(tracked);
        assert!(cancels.lock().running.is_empty());
    }

    #[test]
    fn cancelled_tickets_are_remembered_up_to_the_bound() {
        let cancels = Cancels::default();
        let n = super::REMEMBERED + 5;
        for i in 0..n {
            cancels.cancel([Bytes::from(format!("t{i}"))]);
        }
        let inner = cancels.lock();
        assert_eq!(inner.cancelled.len(), super::REMEMBERED);
        assert_eq!(inner.cancelled_set.len(), super::REMEMBERED);
        assert!(!inner.cancelled_set.contains(&Bytes::from_static(b"t0")));
        assert!(
            inner
                .cancelled_set
                .contains(&Bytes::from(format!("t{}", n - 1)))
        );
    }
}

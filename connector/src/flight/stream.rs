//! Encoding a query's batches as Flight data, and observing the stream: one
//! tracing span per query with principal, query id, rows, bytes, duration and
//! outcome, and the matching Prometheus metrics. The observation ends when the
//! stream ends, fails, or is dropped because the client went away.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use arrow_flight::FlightData;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use futures::{Stream, StreamExt};
use sluice_policy::Principal;
use tonic::Status;
use tracing::{Span, field};

use crate::audit::Completion;
use crate::metrics::Metrics;
use crate::query::QueryRun;

pub type FlightDataStream =
    Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// The span of one query, opened when DoGet starts: execution runs in it
/// (a distributed query's workers report there), and it closes when the
/// stream ends.
pub fn query_span(principal: &Principal) -> Span {
    tracing::info_span!(
        "query",
        query_id = field::Empty,
        principal = %principal,
        rows = field::Empty,
        bytes = field::Empty,
        duration_ms = field::Empty,
        outcome = field::Empty,
    )
}

/// Turns a running query into the DoGet response stream, observed in
/// `span` ([`query_span`]). `started` is when DoGet began: a DP answer is
/// computed before its stream exists, and the query's duration must
/// include that work.
pub fn encode_query(
    run: QueryRun,
    span: Span,
    metrics: Arc<Metrics>,
    started: Instant,
) -> FlightDataStream {
    let observer = Arc::new(Observer::new(span, metrics, run.completion, started));
    let counting = observer.clone();
    let batches = run.batches.map(move |item| match item {
        Ok(batch) => {
            counting
                .rows
                .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
            Ok(batch)
        }
        Err(e) => {
            counting.fail(e.outcome());
            Err(FlightError::Tonic(Box::new(e.into())))
        }
    });
    let mut encoder = FlightDataEncoderBuilder::new().with_schema(run.schema);
    if let Some(receipt) = &run.receipt {
        // The first message (the schema) carries the receipt, so a client
        // that reads app_metadata keeps it with the data.
        encoder = encoder.with_metadata(receipt.to_header().into());
    }
    let encoded = encoder.build(batches).map(|r| r.map_err(Status::from));
    Box::pin(Observed {
        inner: Box::pin(encoded),
        observer,
    })
}

/// Encodes a single metadata batch (catalogs, tables, SqlInfo, …).
pub fn encode_batch(
    schema: datafusion::arrow::datatypes::SchemaRef,
    batch: datafusion::arrow::record_batch::RecordBatch,
) -> FlightDataStream {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map(|r| r.map_err(Status::from));
    Box::pin(stream)
}

struct Observer {
    span: Span,
    started: Instant,
    rows: AtomicU64,
    bytes: AtomicU64,
    outcome: Mutex<Option<&'static str>>,
    metrics: Arc<Metrics>,
    completion: Mutex<Option<Completion>>,
}

impl Observer {
    fn new(
        span: Span,
        metrics: Arc<Metrics>,
        completion: Option<Completion>,
        started: Instant,
    ) -> Self {
        metrics.active_queries.inc();
        Self {
            span,
            started,
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            outcome: Mutex::new(None),
            metrics,
            completion: Mutex::new(completion),
        }
    }

    /// Records the first outcome; later ones do not overwrite it.
    fn settle(&self, outcome: &'static str) {
        self.outcome
            .lock()
            .expect("outcome lock")
            .get_or_insert(outcome);
    }

    fn fail(&self, outcome: &'static str) {
        self.settle(outcome);
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .lock()
            .expect("outcome lock")
            .unwrap_or("cancelled");
        let rows = self.rows.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        self.metrics.active_queries.dec();
        self.metrics.count_query(outcome);
        self.metrics.result_rows.inc_by(rows);
        self.metrics.result_bytes.inc_by(bytes);
        self.metrics.query_duration.observe(elapsed.as_secs_f64());
        let duration_ms = elapsed.as_secs_f64() * 1e3;
        self.span.record("rows", rows);
        self.span.record("bytes", bytes);
        self.span.record("duration_ms", duration_ms);
        self.span.record("outcome", outcome);
        tracing::info!(parent: &self.span, outcome, rows, bytes, duration_ms, "query finished");
        if let Some(completion) = self.completion.lock().expect("completion lock").take() {
            let outcome = match outcome {
                "ok" => "completed",
                other => other,
            };
            completion.finish(outcome, rows, bytes);
        }
    }
}

struct Observed {
    inner: FlightDataStream,
    observer: Arc<Observer>,
}

impl Stream for Observed {
    type Item = Result<FlightData, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let _entered = self.observer.span.clone().entered();
        let poll = self.inner.as_mut().poll_next(cx);
        match &poll {
            Poll::Ready(Some(Ok(data))) => {
                let n = data.data_header.len() + data.data_body.len() + data.app_metadata.len();
                self.observer.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Poll::Ready(Some(Err(_))) => self.observer.fail("internal"),
            Poll::Ready(None) => self.observer.settle("ok"),
            Poll::Pending => {}
        }
        poll
    }
}

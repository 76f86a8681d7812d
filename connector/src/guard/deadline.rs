//! Enforcing a query's deadline inside DataFusion's operators.
//!
//! A timer around the result stream is not enough: DataFusion operators are
//! polled cooperatively, and one `poll_next` of an aggregate over a nested
//! loop join can run for minutes without returning to the runtime, so a
//! timer racing it never gets to fire, and the query keeps a thread busy
//! long after the client gave up. [`with_deadline`] puts a [`DeadlineExec`]
//! above every operator's output, so every batch that moves between two
//! operators checks the clock: past the deadline, the batch is replaced by
//! an error and the whole plan unwinds within one batch of work.
//!
//! The same wrapper makes execution share the query runtime. A CPU-bound
//! operator whose input is always ready never returns `Pending`, so its
//! task keeps a worker thread for as long as it runs, and every other
//! tenant's query waits behind it. After [`TIME_SLICE`] of uninterrupted
//! work, a [`DeadlineStream`] yields the way `tokio::task::yield_now` does:
//! its task is woken again only once the runtime has run every other ready
//! task, so a small query never waits behind a heavy one for more than a
//! slice at a time. (Waking itself directly would not do: the scheduler may
//! run a task that wakes itself again at once.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions,
};
use datafusion_distributed::NetworkBoundaryExt;
use futures::Stream;
use std::future::Future;

/// How long one operator's stream may keep its task busy before it yields.
pub const TIME_SLICE: Duration = Duration::from_millis(2);

/// The error an operator raises when the deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the query's deadline has passed")]
pub struct DeadlinePassed;

/// True if `err` was raised by a [`DeadlineExec`].
pub fn is_deadline(err: &DataFusionError) -> bool {
    matches!(err.find_root(), DataFusionError::External(e) if e.is::<DeadlinePassed>())
}

/// Wraps the output of every operator of `plan` in a [`DeadlineExec`].
///
/// A distributed plan's stages below a network boundary run on workers and
/// are sent there encoded: they are left as they are. The deadline stops
/// the coordinator's side, and the workers' streams end when it drops them.
pub fn with_deadline(
    plan: Arc<dyn ExecutionPlan>,
    deadline: Instant,
) -> Result<Arc<dyn ExecutionPlan>> {
    Ok(Arc::new(DeadlineExec::new(
        wrap_inputs(plan, deadline)?,
        deadline,
    )))
}

fn wrap_inputs(node: Arc<dyn ExecutionPlan>, deadline: Instant) -> Result<Arc<dyn ExecutionPlan>> {
    if node.children().is_empty() || node.is_network_boundary() {
        return Ok(node);
    }
    let children = node
        .children()
        .into_iter()
        .map(|child| {
            // A wrapper that delegates downcasts would make a network
            // boundary appear twice to datafusion-distributed (it looks
            // boundaries up by downcasting): boundaries stay unwrapped.
            if child.is_network_boundary() {
                return Ok(Arc::clone(child));
            }
            let wrapped = wrap_inputs(Arc::clone(child), deadline)?;
            Ok(Arc::new(DeadlineExec::new(wrapped, deadline)) as Arc<dyn ExecutionPlan>)
        })
        .collect::<Result<Vec<_>>>()?;
    // The wrappers have their inputs' exact properties.
    node.replace_children(
        children,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
    )
}

/// Passes its input through unchanged until the deadline, then fails.
#[derive(Debug)]
pub struct DeadlineExec {
    input: Arc<dyn ExecutionPlan>,
    deadline: Instant,
}

impl DeadlineExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, deadline: Instant) -> Self {
        Self { input, deadline }
    }
}

impl DisplayAs for DeadlineExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadlineExec")
    }
}

impl ExecutionPlan for DeadlineExec {
    fn name(&self) -> &str {
        "DeadlineExec"
    }

    // Parents that look for a particular child type see through the wrapper.
    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.input.as_ref())
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "DeadlineExec takes one input".into(),
            ));
        }
        Ok(Arc::new(DeadlineExec::new(
            children.swap_remove(0),
            self.deadline,
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(DeadlineStream {
            input,
            deadline: self.deadline,
            busy_since: Instant::now(),
        }))
    }
}

struct DeadlineStream {
    input: SendableRecordBatchStream,
    deadline: Instant,
    /// When this stream last returned `Pending`.
    busy_since: Instant,
}

impl Stream for DeadlineStream {
    type Item = Result<datafusion::arrow::record_batch::RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let now = Instant::now();
        if now >= self.deadline {
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(
                DeadlinePassed,
            )))));
        }
        if now.duration_since(self.busy_since) >= TIME_SLICE {
            self.busy_since = now;
            let mut yielding = std::pin::pin!(tokio::task::yield_now());
            if yielding.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let polled = self.input.as_mut().poll_next(cx);
        if polled.is_pending() {
            self.busy_since = Instant::now();
        }
        polled
    }
}

impl RecordBatchStream for DeadlineStream {
    fn schema(&self) -> datafusion::arrow::datatypes::SchemaRef {
        self.input.schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;
    use std::time::Duration;

    #[tokio::test]
    async fn a_cpu_bound_join_stops_at_the_deadline() {
        let ctx = SessionContext::new();
        let df = ctx
            .sql("SELECT count(*) FROM generate_series(1, 200000) a JOIN generate_series(1, 200000) b ON a.value < b.value")
            .await
            .unwrap();
        let physical = df.create_physical_plan().await.unwrap();
        let started = Instant::now();
        let plan = with_deadline(physical, started + Duration::from_millis(200)).unwrap();
        let err = datafusion::physical_plan::collect(plan, ctx.task_ctx())
            .await
            .unwrap_err();
        assert!(is_deadline(&err), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn results_are_unchanged_before_the_deadline() {
        let ctx = SessionContext::new();
        let sql = "SELECT value % 7 AS k, count(*) AS n FROM generate_series(1, 10000) GROUP BY k ORDER BY k";
        let physical = ctx
            .sql(sql)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let plan = with_deadline(physical, Instant::now() + Duration::from_secs(600)).unwrap();
        let got = datafusion::physical_plan::collect(plan, ctx.task_ctx())
            .await
            .unwrap();
        let want = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        assert_eq!(got, want);
    }
}

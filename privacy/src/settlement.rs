//! Returning budget off the caller's thread.
//!
//! A [`crate::BudgetHold`] is dropped wherever its query ends: on an async
//! worker when a ticket expires or a request fails, inside a cancelled
//! future, in a destructor. A refund is a ledger transaction with an
//! fsync, which must not run there, and must not be forgotten either. So
//! the drop only queues the reservation id; one thread per ledger applies
//! the refunds in order. Until it has, the reservation still counts as
//! spent, so a queued refund can only make the budget look smaller for a
//! moment, never larger.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use crate::ledger::Ledger;

enum Job {
    Refund(String),
    /// Answered once every job queued before it is done.
    Flush(Sender<()>),
}

pub(crate) struct Settlement {
    jobs: Mutex<Sender<Job>>,
}

impl Settlement {
    /// Starts the settlement thread; it ends when the [`Settlement`] is
    /// dropped, after the jobs already queued.
    pub(crate) fn start(ledger: Arc<Ledger>) -> Self {
        let (jobs, queue) = channel();
        std::thread::Builder::new()
            .name("privacy-settlement".into())
            .spawn(move || settle(&ledger, queue))
            .expect("the privacy settlement thread can be started");
        Self {
            jobs: Mutex::new(jobs),
        }
    }

    /// Queues the refund of reservation `id`.
    pub(crate) fn refund(&self, id: String) {
        self.send(Job::Refund(id));
    }

    /// Blocks until every refund queued so far is in the ledger.
    pub(crate) fn flush(&self) {
        let (done, wait) = channel();
        self.send(Job::Flush(done));
        let _ = wait.recv();
    }

    fn send(&self, job: Job) {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.send(job).is_err() {
            tracing::error!("the privacy settlement thread has stopped; a refund is lost");
        }
    }
}

fn settle(ledger: &Ledger, queue: Receiver<Job>) {
    for job in queue {
        match job {
            Job::Refund(id) => {
                if let Err(e) = ledger.refund(&id) {
                    tracing::error!(error = %e, reservation = %id, "could not return a privacy-budget reservation");
                }
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

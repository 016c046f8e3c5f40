//! The scheduler's thread. The library's [`Scheduler`] is synchronous and borrows the engine,
//! so it lives on one OS thread that the async handlers talk to through channels: a handler
//! submits a prepared request and gets a receiver of that request's events; dropping the
//! receiver (the client went away) cancels the request at the next step, and so does
//! [`Ticket`]'s drop while it still waits in the queue. A panic inside a step fails the requests
//! then running, never the server: the scheduler is rebuilt and serving goes on.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};

use phi4mm::engine::Prepared;
use phi4mm::{Engine, Error, Event, GenerateRequest, RequestId, Scheduler, SchedulerOptions};
use tokio::sync::{mpsc as tmpsc, oneshot};

/// What the handlers ask of the worker.
enum Command {
    Submit {
        req: Box<GenerateRequest>,
        prepared: Box<Prepared>,
        events: tmpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<phi4mm::Result<RequestId>>,
    },
    Cancel(RequestId),
}

/// Counts the handlers and `/metrics` read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
    pub kv_reserved: usize,
    pub kv_budget: usize,
}

/// A handle to the scheduler thread (cheap to clone).
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Command>,
    load: Arc<Mutex<Load>>,
}

impl Worker {
    /// Starts the scheduler thread on `engine`.
    pub fn start(engine: Arc<Engine>, opts: SchedulerOptions) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Mutex::new(Load { kv_budget: opts.kv_budget, ..Load::default() }));
        let shared = load.clone();
        std::thread::Builder::new().name("phi4mm-scheduler".into()).spawn(move || run(&engine, opts, &rx, &shared))?;
        Ok(Worker { tx, load })
    }

    /// Queues `req`; its events arrive on the returned receiver, the last being `Done`,
    /// `Cancelled` or `Failed`. A full queue is [`Error::QueueFull`].
    pub async fn submit(&self, req: GenerateRequest, prepared: Prepared) -> phi4mm::Result<(Ticket, tmpsc::UnboundedReceiver<Event>)> {
        let (events, rx) = tmpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Submit { req: Box::new(req), prepared: Box::new(prepared), events, reply };
        self.tx.send(cmd).map_err(|_| stopped())?;
        let id = answer.await.map_err(|_| stopped())??;
        Ok((Ticket { id, worker: self.clone(), done: false }, rx))
    }

    pub fn cancel(&self, id: RequestId) {
        // The worker is gone only when the server stops; nothing is left to cancel then.
        let _ = self.tx.send(Command::Cancel(id));
    }

    /// The counts as of the last step.
    pub fn load(&self) -> Load {
        self.load.lock().map(|l| *l).unwrap_or_default()
    }
}

fn stopped() -> Error {
    Error::Request("the scheduler thread has stopped".into())
}

/// A submitted request: cancels it when dropped before [`Ticket::finish`] (the client went away).
pub struct Ticket {
    pub id: RequestId,
    worker: Worker,
    done: bool,
}

impl Ticket {
    /// The request ended; dropping the ticket no longer cancels.
    pub fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.worker.cancel(self.id);
        }
    }
}

/// The scheduler loop: waits for work when idle, else takes every pending command and steps.
fn run(engine: &Engine, opts: SchedulerOptions, rx: &mpsc::Receiver<Command>, load: &Mutex<Load>) {
    let mut sched = Scheduler::new(engine, opts.clone());
    let mut streams: HashMap<RequestId, tmpsc::UnboundedSender<Event>> = HashMap::new();
    loop {
        if sched.is_idle() {
            match rx.recv() {
                Ok(cmd) => take(&mut sched, &mut streams, cmd),
                Err(_) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            take(&mut sched, &mut streams, cmd);
        }
        match catch_unwind(AssertUnwindSafe(|| sched.step())) {
            Ok(events) => route(&mut sched, &mut streams, events),
            Err(_) => {
                tracing::error!("a scheduler step panicked; failing the requests it held and starting afresh");
                for (id, tx) in streams.drain() {
                    let error = Error::Request("internal error while generating this request (the server goes on)".into());
                    let _ = tx.send(Event::Failed { id, error });
                }
                sched = Scheduler::new(engine, opts.clone());
            }
        }
        if let Ok(mut l) = load.lock() {
            *l = Load { running: sched.running(), waiting: sched.queued(), kv_reserved: sched.kv_reserved(), kv_budget: opts.kv_budget };
        }
    }
}

fn take(sched: &mut Scheduler, streams: &mut HashMap<RequestId, tmpsc::UnboundedSender<Event>>, cmd: Command) {
    match cmd {
        Command::Submit { req, prepared, events, reply } => {
            let r = sched.submit_prepared(*req, *prepared);
            if let Ok(id) = r {
                streams.insert(id, events);
            }
            if let Err(Ok(id)) = reply.send(r) {
                // The handler is gone already.
                sched.cancel(id);
            }
        }
        Command::Cancel(id) => {
            sched.cancel(id);
        }
    }
}

/// Hands each event to its request's receiver; a receiver that is gone cancels its request.
fn route(sched: &mut Scheduler, streams: &mut HashMap<RequestId, tmpsc::UnboundedSender<Event>>, events: Vec<Event>) {
    for e in events {
        let id = e.id();
        let last = matches!(e, Event::Done { .. } | Event::Cancelled { .. } | Event::Failed { .. });
        let Some(tx) = streams.get(&id) else { continue };
        if tx.send(e).is_err() && !last {
            sched.cancel(id);
        }
        if last {
            streams.remove(&id);
        }
    }
}

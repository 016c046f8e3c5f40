//! The scheduler's thread. The library's [`Scheduler`] is synchronous and borrows the engine,
//! so it lives on one OS thread that the async handlers talk to through channels: a handler
//! submits a prepared request and gets a receiver of that request's events; dropping the
//! receiver (the client went away) cancels the request at the next step, and so does
//! [`Ticket`]'s drop while it still waits in the queue. A panic inside a step fails the requests
//! then running, never the server: the scheduler is rebuilt and serving goes on.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use phi4mm::engine::{FinishReason, Prepared};
use phi4mm::scheduler::Stage;
use phi4mm::{Engine, Error, Event, GenerateRequest, Mode, RequestId, Scheduler, SchedulerOptions};
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::metrics::Metrics;

/// What the handlers ask of the worker.
enum Command {
    Submit { req: Box<GenerateRequest>, prepared: Box<Prepared>, events: tmpsc::UnboundedSender<Event>, reply: oneshot::Sender<phi4mm::Result<RequestId>> },
    Cancel(RequestId),
}

/// Counts the handlers and `/metrics` read.
#[derive(Debug, Default, Clone)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
    pub kv_reserved: usize,
    pub kv_budget: usize,
    /// The adapters of the running and of the waiting requests (`vision`, `speech`), comma-separated.
    pub running_adapters: String,
    pub waiting_adapters: String,
}

/// One request on the worker: where its events go and what its metrics need.
struct Live {
    tx: tmpsc::UnboundedSender<Event>,
    mode: Mode,
    prompt: usize,
    arrived: Instant,
    /// Its first event came (it was admitted).
    started: bool,
    last_token: Option<Instant>,
    /// The start of the step that began encoding its media.
    media_from: Option<Instant>,
}

type Streams = HashMap<RequestId, Live>;

/// A handle to the scheduler thread (cheap to clone).
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Command>,
    load: Arc<Mutex<Load>>,
}

impl Worker {
    /// Starts the scheduler thread on `engine`.
    pub fn start(engine: Arc<Engine>, opts: SchedulerOptions, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Mutex::new(Load { kv_budget: opts.kv_budget, ..Load::default() }));
        let shared = load.clone();
        std::thread::Builder::new().name("phi4mm-scheduler".into()).spawn(move || run(&engine, opts, &rx, &shared, &metrics))?;
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
        self.load.lock().map(|l| l.clone()).unwrap_or_default()
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
fn run(engine: &Engine, opts: SchedulerOptions, rx: &mpsc::Receiver<Command>, load: &Mutex<Load>, metrics: &Metrics) {
    let mut sched = Scheduler::new(engine, opts.clone());
    let mut streams = Streams::new();
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
        let step = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| sched.step())) {
            Ok(events) => route(&mut sched, &mut streams, events, step, metrics),
            Err(_) => {
                tracing::error!("a scheduler step panicked; failing the requests it held and starting afresh");
                for (id, live) in streams.drain() {
                    let error = Error::Request("internal error while generating this request (the server goes on)".into());
                    let _ = live.tx.send(Event::Failed { id, error });
                }
                sched = Scheduler::new(engine, opts.clone());
            }
        }
        if let Ok(mut l) = load.lock() {
            *l = Load {
                running: sched.running(),
                waiting: sched.queued(),
                kv_reserved: sched.kv_reserved(),
                kv_budget: opts.kv_budget,
                running_adapters: adapters(&streams, true),
                waiting_adapters: adapters(&streams, false),
            };
        }
    }
}

/// The distinct adapters of the started (or waiting) requests.
fn adapters(streams: &Streams, started: bool) -> String {
    let mut names: Vec<&str> = streams
        .values()
        .filter(|l| l.started == started)
        .filter_map(|l| match l.mode {
            Mode::Vision => Some("vision"),
            Mode::Speech => Some("speech"),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

fn take(sched: &mut Scheduler, streams: &mut Streams, cmd: Command) {
    match cmd {
        Command::Submit { req, prepared, events, reply } => {
            let (mode, prompt) = (prepared.mode, prepared.ids.len());
            let r = sched.submit_prepared(*req, *prepared);
            if let Ok(id) = r {
                let live = Live { tx: events, mode, prompt, arrived: Instant::now(), started: false, last_token: None, media_from: None };
                streams.insert(id, live);
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

/// Hands each event to its request's receiver (a receiver that is gone cancels its request)
/// and records its metrics; `step` is when the step that made the events began.
fn route(sched: &mut Scheduler, streams: &mut Streams, events: Vec<Event>, step: Instant, m: &Metrics) {
    let now = Instant::now();
    for e in events {
        let id = e.id();
        let last = matches!(e, Event::Done { .. } | Event::Cancelled { .. } | Event::Failed { .. });
        let Some(live) = streams.get_mut(&id) else { continue };
        live.started = true;
        observe(live, &e, step, now, m);
        if live.tx.send(e).is_err() && !last {
            sched.cancel(id);
        }
        if last {
            streams.remove(&id);
        }
    }
}

fn observe(live: &mut Live, e: &Event, step: Instant, now: Instant, m: &Metrics) {
    match e {
        Event::Progress { stage, done, total, .. } if matches!(stage, Stage::Images | Stage::Audio) => {
            let from = *live.media_from.get_or_insert(step);
            if done >= total {
                let medium = if matches!(stage, Stage::Images) { "image" } else { "audio" };
                m.media_encode.with_label_values(&[medium]).observe((now - from).as_secs_f64());
            }
        }
        Event::Token { .. } => {
            match live.last_token {
                None => m.ttft.observe((now - live.arrived).as_secs_f64()),
                Some(t) => m.itl.observe((now - t).as_secs_f64()),
            }
            live.last_token = Some(now);
            m.generation_tokens.inc();
        }
        Event::Done { completion, .. } => {
            m.e2e.observe((now - live.arrived).as_secs_f64());
            m.prompt_tokens.inc_by(live.prompt as u64);
            let reason = if completion.finish_reason == FinishReason::Stop { "stop" } else { "length" };
            m.finished.with_label_values(&[reason]).inc();
        }
        Event::Cancelled { .. } => m.finished.with_label_values(&["abort"]).inc(),
        Event::Failed { .. } => m.finished.with_label_values(&["error"]).inc(),
        Event::Progress { .. } => {}
    }
}

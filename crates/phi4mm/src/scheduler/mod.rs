//! Many requests at once (continuous batching), without an async runtime: [`Scheduler::submit`]
//! queues a request, [`Scheduler::step`] advances every admitted one and returns what
//! happened as [`Event`]s, [`Scheduler::cancel`] ends one at the next step.
//!
//! A step is one decode step for every sequence that is generating — all modes together:
//! each weight read once for the batch, each LoRA adapter once for the rows of its mode
//! ([`Decoder::decode_batch`](crate::decoder::Decoder::decode_batch)) — followed by pieces of
//! preparation work for the oldest sequences still preparing, for a share of the time the
//! decode step took ([`SchedulerOptions::prepare_share`]). A piece is small and fixed by the input alone: a third of a
//! tower layer of one image crop, one Conformer block of one audio window (or a subsampling
//! chunk, or a projection), a third of a decoder block of a prompt chunk of at most
//! `prefill_chunk` rows. So a 1280×720
//! image, a 30-minute recording or a long prompt arriving delays the running streams by
//! about one decode step per token, not by its whole encoding. Since the pieces are the
//! same whatever the timing, a sequence's numbers do not depend on the others in its step
//! (batch invariance): the same request gives the same tokens and log-probabilities alone or
//! in any batch, and [`Engine::generate`] is this scheduler with one request.
//!
//! Memory: every admitted sequence reserves its prompt plus `max_new_tokens` positions of a
//! KV budget; a request waits in a bounded queue until that fits, and a full queue is
//! [`Error::QueueFull`].

mod prefix;
mod seq;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::decoder::DecodeRow;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::engine::request::{Completion, FinishReason, GenerateRequest, Prepared, TokenInfo};
use prefix::PrefixCache;
pub use prefix::CacheStats;
use seq::{Phase, Seq};

/// A request's handle.
pub type RequestId = u64;

/// Positions each cache reserves beyond the prompt before it has to grow.
const CACHE_STEP: usize = 512;

/// Prompt rows prefilled per step by default. The chunk size is part of the numbers: the
/// prefill GEMMs and attention of a 256-row chunk do not sum in the same order as those of a
/// 2048-row one, so every path that should agree bit for bit (the CLI, the server, the tests)
/// uses this one value.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Preparation time per step as a share of the decode step's ([`SchedulerOptions::prepare_share`]).
pub const DEFAULT_PREPARE_SHARE: f64 = 0.8;

/// How long a step prepares when no sequence is decoding (then nobody waits on a token; the
/// step returns so new requests and cancellations are seen).
const IDLE_PREPARE: Duration = Duration::from_millis(500);

/// How the scheduler batches.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Most sequences admitted at once (decoded together).
    pub max_batch: usize,
    /// Most requests waiting for admission; one more is [`Error::QueueFull`].
    pub max_queue: usize,
    /// KV positions all admitted sequences may reserve together.
    pub kv_budget: usize,
    /// Most prompt rows prefilled per step ([`DEFAULT_PREFILL_CHUNK`]; another value changes
    /// the last bits of the prefill, so results then differ from [`Engine::generate`]'s).
    pub prefill_chunk: usize,
    /// Keep the KV of prompt blocks for later requests that start the same way (they count
    /// against `kv_budget`, evicted least recently used first).
    pub prefix_cache: bool,
    /// Bytes of encoded media features kept for later requests with the same image or audio
    /// (0: none).
    pub media_cache_bytes: usize,
    /// Preparation time per step as a share of that step's decode time (0.8 by default: the
    /// running streams' inter-token latency stays near 1.8× the decode step while requests
    /// are admitted; more brings new requests their first token sooner). At least one piece
    /// runs per step; [`IDLE_PREPARE`] when nothing decodes.
    pub prepare_share: f64,
    /// Preparation pieces per step instead of a time: `Some(n)` runs exactly up to `n` (for
    /// reproducible interleaving in tests). Either way the numbers are the same.
    pub pieces_per_step: Option<usize>,
}

impl SchedulerOptions {
    /// Defaults for `engine`: batches of 8, a queue of 64, chunks of 256 rows, a KV budget of
    /// half the memory available now (at least one full context), the prefix cache on and
    /// 512 MiB of media features.
    pub fn for_engine(engine: &Engine) -> Self {
        let per = engine.decoder().kv_bytes_per_position().max(1);
        let half = available_memory().map_or(usize::MAX, |b| b / 2 / per);
        SchedulerOptions {
            max_batch: 8,
            max_queue: 64,
            kv_budget: half.max(engine.max_context()),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            prefix_cache: true,
            media_cache_bytes: 512 << 20,
            prepare_share: DEFAULT_PREPARE_SHARE,
            pieces_per_step: None,
        }
    }

    /// One request at a time with no caches and no budget (what [`Engine::generate`] runs).
    pub fn single() -> Self {
        SchedulerOptions {
            max_batch: 1,
            max_queue: 1,
            kv_budget: usize::MAX,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            prefix_cache: false,
            media_cache_bytes: 0,
            prepare_share: DEFAULT_PREPARE_SHARE,
            pieces_per_step: None,
        }
    }

    /// A KV budget written as GiB (`8`, `8GiB`, `1.5G`), MiB (`512MiB`, `512M`) or positions
    /// (`20000tok`, `20000positions`), in positions of `engine`'s cache format.
    pub fn parse_kv_budget(engine: &Engine, s: &str) -> Result<usize> {
        let t = s.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || Error::Request(format!("bad KV budget `{s}`: use GiB (`8`, `8GiB`), MiB (`512MiB`) or positions (`20000tok`)"));
        let n: f64 = num.parse().map_err(|_| bad())?;
        let positions = match unit.trim() {
            "" | "g" | "gb" | "gib" => Self::kv_budget_gib(engine, n),
            "m" | "mb" | "mib" => Self::kv_budget_gib(engine, n / 1024.0),
            "tok" | "tokens" | "positions" | "pos" => n as usize,
            _ => return Err(bad()),
        };
        if !(n.is_finite() && n > 0.0) || positions == 0 {
            return Err(bad());
        }
        Ok(positions)
    }

    /// A budget of `gib` GiB of KV cache, in positions of `engine`'s cache format.
    pub fn kv_budget_gib(engine: &Engine, gib: f64) -> usize {
        (gib * (1u64 << 30) as f64 / engine.decoder().kv_bytes_per_position().max(1) as f64) as usize
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux).
fn available_memory() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a prompt-progress event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Image crops through the tower (all images of the request together; an image found
    /// in the media cache counts all its crops at once).
    Images,
    /// Audio windows encoded (all audios of the request together; one of one when found in
    /// the media cache).
    Audio,
    /// Prompt positions prefilled (after a LongRoPE crossing: the whole sequence again).
    Prompt,
}

/// What a step did for one request.
#[derive(Debug)]
pub enum Event {
    /// `done` of `total` units of `stage`.
    Progress { id: RequestId, stage: Stage, done: usize, total: usize },
    /// A generated token: `text` is the newly completed text (may be empty); `logits` (the raw
    /// logits that produced it) only when the request asked for them.
    Token { id: RequestId, token: TokenInfo, text: String, logits: Option<Vec<f32>> },
    /// The request ended by an end-of-sequence id, a stop string or its length.
    Done { id: RequestId, completion: Completion },
    /// The request was cancelled; what it had generated (finish reason `length`).
    Cancelled { id: RequestId, completion: Option<Completion> },
    /// The request failed; the others go on.
    Failed { id: RequestId, error: Error },
}

impl Event {
    /// The request the event belongs to.
    pub fn id(&self) -> RequestId {
        match self {
            Event::Progress { id, .. } | Event::Token { id, .. } | Event::Done { id, .. } => *id,
            Event::Cancelled { id, .. } | Event::Failed { id, .. } => *id,
        }
    }
}

/// A queued request.
struct Waiting {
    id: RequestId,
    req: GenerateRequest,
    prepared: Prepared,
    need: usize,
}

/// The batching scheduler over one loaded model.
pub struct Scheduler<'e> {
    engine: &'e Engine,
    opts: SchedulerOptions,
    waiting: VecDeque<Waiting>,
    running: Vec<Seq<'e>>,
    cancelled: Vec<RequestId>,
    next_id: RequestId,
    cache: PrefixCache,
    /// How long a preparation piece of each kind took lately ([`Seq::piece_kind`]).
    piece_secs: HashMap<usize, Duration>,
}

impl<'e> Scheduler<'e> {
    pub fn new(engine: &'e Engine, opts: SchedulerOptions) -> Self {
        let cache = PrefixCache::new(opts.prefill_chunk, opts.prefix_cache, opts.media_cache_bytes);
        Scheduler { engine, opts, waiting: VecDeque::new(), running: Vec::new(), cancelled: Vec::new(), next_id: 1, cache, piece_secs: HashMap::new() }
    }

    /// What the prefix and media caches hold and did.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn options(&self) -> &SchedulerOptions {
        &self.opts
    }

    /// Validates and prepares (templates, tokenizes, decodes media) a request and queues it.
    /// Errors name what is wrong with the request; a full queue is [`Error::QueueFull`].
    pub fn submit(&mut self, req: GenerateRequest) -> Result<RequestId> {
        if self.waiting.len() >= self.opts.max_queue {
            return Err(Error::QueueFull(self.opts.max_queue));
        }
        let prepared = self.engine.prepare(&req)?;
        self.submit_prepared(req, prepared)
    }

    /// [`Scheduler::submit`] of already prepared ids.
    /// A request that can never run (too long for the budget, bad values) is refused before a
    /// full queue is.
    pub fn submit_prepared(&mut self, req: GenerateRequest, prepared: Prepared) -> Result<RequestId> {
        self.engine.check_lengths(&prepared, &req)?;
        req.sampling.validate()?;
        let need = prepared.ids.len() + req.max_new_tokens;
        if need > self.opts.kv_budget {
            return Err(Error::Request(format!(
                "the request needs {need} KV positions (prompt {} + max_new_tokens {}) but the KV budget is {}; \
                 shorten it or raise the budget",
                prepared.ids.len(),
                req.max_new_tokens,
                self.opts.kv_budget
            )));
        }
        if self.waiting.len() >= self.opts.max_queue {
            return Err(Error::QueueFull(self.opts.max_queue));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting { id, req, prepared, need });
        Ok(id)
    }

    /// Ends request `id` at the next step (its memory is freed then). False if unknown.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        let known = self.waiting.iter().any(|w| w.id == id) || self.running.iter().any(|s| s.id == id);
        if known && !self.cancelled.contains(&id) {
            self.cancelled.push(id);
        }
        known
    }

    /// Requests admitted (encoding, prefilling or generating).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for admission.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Admitted sequences still encoding media or prefilling.
    pub fn preparing(&self) -> usize {
        self.running.iter().filter(|s| s.phase != Phase::Decode).count()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV positions reserved by the admitted sequences.
    pub fn kv_reserved(&self) -> usize {
        self.running.iter().map(|s| s.reserved).sum()
    }

    /// One scheduling step: cancellations, admissions, one decode step for every generating
    /// sequence, then preparation work for a share of that time. Returns the events, in order.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.drop_cancelled(&mut events);
        self.admit(&mut events);
        let t = Instant::now();
        let decoding = self.running.iter().any(|s| s.phase == Phase::Decode);
        self.decode(&mut events);
        let budget = if decoding { t.elapsed().mul_f64(self.opts.prepare_share.max(0.0)) } else { IDLE_PREPARE };
        self.prepare(budget, &mut events);
        events
    }

    fn drop_cancelled(&mut self, events: &mut Vec<Event>) {
        for id in std::mem::take(&mut self.cancelled) {
            if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
                self.waiting.remove(i);
                events.push(Event::Cancelled { id, completion: None });
            } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
                let mut s = self.running.remove(i);
                events.push(Event::Cancelled { id, completion: s.finish(FinishReason::Length).ok() });
            }
        }
    }

    /// KV budget positions not reserved by running sequences (the prefix cache may use them).
    fn room(&self) -> usize {
        self.opts.kv_budget.saturating_sub(self.kv_reserved())
    }

    /// Admits waiting requests in order while the batch and the KV budget have room (cached
    /// blocks give way), restoring each one's cached prefix.
    fn admit(&mut self, events: &mut Vec<Event>) {
        while self.running.len() < self.opts.max_batch {
            let Some(w) = self.waiting.front() else { break };
            if self.kv_reserved() + w.need > self.opts.kv_budget {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            let cap = w.need.min(w.prepared.ids.len() + CACHE_STEP);
            let (engine, pc) = (self.engine, &mut self.cache);
            let seq = engine.decoder().new_cache(cap).and_then(|cache| {
                let mut s = Seq::new(engine, w.id, w.req, w.prepared, w.need, cache, pc)?;
                s.restore(engine, pc, false)?;
                Ok(s)
            });
            match seq {
                Ok(s) => self.running.push(s),
                Err(error) => events.push(Event::Failed { id: w.id, error }),
            }
            let room = self.room();
            self.cache.shrink_to(room);
        }
    }

    /// One decode step for every sequence in the decode phase.
    fn decode(&mut self, events: &mut Vec<Event>) {
        let engine = self.engine;
        let mut ready = Vec::new();
        let mut failed = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.phase != Phase::Decode {
                continue;
            }
            match s.prepare_step(engine) {
                Ok(true) => ready.push(i),
                // Back to prefill (LongRoPE crossing): that may be cached too.
                Ok(false) => {
                    if let Err(e) = s.restore(engine, &mut self.cache, true) {
                        failed.push((i, e));
                    }
                }
                Err(e) => failed.push((i, e)),
            }
        }
        let mut ended: Vec<usize> = Vec::new();
        if !ready.is_empty() {
            let mut rows = Vec::with_capacity(ready.len());
            for (i, s) in self.running.iter_mut().enumerate() {
                if let (true, Some(token)) = (ready.contains(&i), s.last_token()) {
                    rows.push(DecodeRow { token, adapter: s.adapter(), cache: &mut s.cache });
                }
            }
            match engine.decoder().decode_batch(&mut rows) {
                Ok(logits) => {
                    for (&i, l) in ready.iter().zip(logits) {
                        match self.running[i].take(engine, l, events) {
                            Ok(true) => ended.push(i),
                            Ok(false) => {}
                            Err(e) => failed.push((i, e)),
                        }
                    }
                }
                // A failed batched step fails the whole batch (no sequence is left half-stepped).
                Err(e) => ready.iter().for_each(|&i| failed.push((i, Error::Request(format!("decode step failed: {e}"))))),
            }
        }
        self.retire(ended, failed, events);
    }

    /// Removes ended and failed sequences (highest index first) and frees their budget.
    fn retire(&mut self, ended: Vec<usize>, failed: Vec<(usize, Error)>, events: &mut Vec<Event>) {
        let mut gone: Vec<(usize, Option<Error>)> = ended.into_iter().map(|i| (i, None)).collect();
        gone.extend(failed.into_iter().map(|(i, e)| (i, Some(e))));
        gone.sort_by_key(|g| std::cmp::Reverse(g.0));
        gone.dedup_by_key(|g| g.0);
        for (i, error) in gone {
            let s = self.running.remove(i);
            if let Some(error) = error {
                events.push(Event::Failed { id: s.id, error });
            }
        }
    }

    /// Preparation pieces for the oldest sequences that are encoding or prefilling: while the
    /// next piece (guessed from the last pieces of its kind) still fits in `budget` — at least
    /// one — or exactly [`SchedulerOptions::pieces_per_step`].
    fn prepare(&mut self, budget: Duration, events: &mut Vec<Event>) {
        let start = Instant::now();
        let mut pieces = 0;
        while let Some(i) = self.running.iter().position(|s| s.phase != Phase::Decode) {
            let (id, phase, kind) = (self.running[i].id, self.running[i].phase, self.running[i].piece_kind());
            let guess = self.piece_secs.get(&kind).copied().unwrap_or_default();
            let fits = match self.opts.pieces_per_step {
                Some(n) => pieces < n,
                None => pieces == 0 || start.elapsed() + guess <= budget,
            };
            if !fits {
                break;
            }
            let t = Instant::now();
            self.prepare_piece(i, events);
            pieces += 1;
            let took = t.elapsed();
            // A running estimate per kind (the last piece counts one half).
            self.piece_secs.insert(kind, if guess.is_zero() { took } else { (guess + took) / 2 });
            if took > Duration::from_millis(100) {
                tracing::debug!(id, ?phase, kind, secs = took.as_secs_f64(), "slow preparation piece");
            }
        }
    }

    /// One piece of work for sequence `i`.
    fn prepare_piece(&mut self, i: usize, events: &mut Vec<Event>) {
        let engine = self.engine;
        let chunk = self.opts.prefill_chunk;
        let room = self.room();
        let s = &mut self.running[i];
        let r = match s.phase {
            Phase::Encode => s.encode_piece(engine, &mut self.cache, events).map(|_| false),
            _ => s.prefill(engine, chunk, &mut self.cache, room, events),
        };
        match r {
            Ok(true) => self.retire(vec![i], Vec::new(), events),
            Ok(false) => {}
            Err(e) => self.retire(Vec::new(), vec![(i, e)], events),
        }
    }

    /// Runs steps until request `id` ends, handing its events to `f` (events of other requests
    /// are dropped: for callers that run one request).
    pub fn run_to_end(&mut self, id: RequestId, mut f: impl FnMut(&Event) -> bool) -> Result<Completion> {
        loop {
            if self.is_idle() {
                return Err(Error::Request(format!("request {id} is not known to the scheduler")));
            }
            for e in self.step() {
                if e.id() != id {
                    continue;
                }
                if !f(&e) {
                    self.cancel(id);
                }
                match e {
                    Event::Done { completion, .. } => return Ok(completion),
                    Event::Cancelled { completion: Some(c), .. } => return Ok(c),
                    Event::Cancelled { completion: None, .. } => return Err(Error::Request(format!("request {id} was cancelled before it started"))),
                    Event::Failed { error, .. } => return Err(error),
                    _ => {}
                }
            }
        }
    }
}

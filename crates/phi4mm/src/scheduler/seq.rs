//! One request inside the scheduler: its media encoded a piece at a time, its prompt
//! prefilled in chunks (each a third of a block at a time), then one token per decode step;
//! sampling, detokenizing and the stop rules are the same for every request.

use std::time::Instant;

use candle_core::Tensor;

use super::prefix::{Key, MediaKeys, PrefixCache};
use super::{Event, RequestId, Stage};
use crate::audio::AudioJob;
use crate::decoder::Prefill;
use crate::text::detok::{StopMatcher, StreamDecoder};
use crate::vision::ImageJob;
use crate::engine::Engine;
use crate::error::Result;
use crate::decoder::kv_cache::KvCache;
use crate::decoder::lora::Adapter;
use crate::engine::request::{Completion, FinishReason, GenerateRequest, Prepared, TokenInfo, Timings};
use crate::text::sampler::{self, Sampler};

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Media left to encode.
    Encode,
    /// Rows of `todo` left to prefill.
    Prefill,
    /// Takes part in every decode step.
    Decode,
}

/// An admitted request.
pub(super) struct Seq<'e> {
    pub id: RequestId,
    pub req: GenerateRequest,
    pub prepared: Prepared,
    /// KV positions reserved in the scheduler's budget.
    pub reserved: usize,
    pub phase: Phase,
    pub cache: KvCache,
    /// Prompt embeddings (after the media are merged).
    emb: Option<Tensor>,
    audio: Option<Tensor>,
    images: Vec<Tensor>,
    /// The audios or the image being encoded.
    audio_job: Option<AudioJob>,
    image_job: Option<ImageJob>,
    /// The prefill chunk in flight.
    chunk: Option<Prefill>,
    /// Rows to prefill (the prompt, or prompt + output on the LongRoPE re-prefill), how many
    /// are done, and their LongRoPE mode.
    todo: Option<Tensor>,
    filled: usize,
    long: bool,
    sampler: Sampler,
    detok: StreamDecoder<'e>,
    stops: StopMatcher,
    history: Vec<u32>,
    tokens: Vec<u32>,
    infos: Vec<TokenInfo>,
    text: String,
    started: Instant,
    first: Option<Instant>,
    prefill_s: f64,
    /// Content keys of the media, when the scheduler caches.
    media_keys: Option<MediaKeys>,
    /// Prefix-cache keys of the full blocks of the rows being prefilled.
    keys: Vec<Key>,
    /// Prompt positions restored from the prefix cache.
    cached: usize,
}

impl<'e> Seq<'e> {
    pub fn new(engine: &'e Engine, id: RequestId, req: GenerateRequest, prepared: Prepared, reserved: usize, cache: KvCache, pc: &PrefixCache) -> Result<Self> {
        let media_keys = pc.enabled().then(|| pc.media_keys(&prepared));
        let sampler = Sampler::new(req.sampling.clone())?.with_mask(req.mask.clone());
        let phase = if prepared.images.is_empty() && prepared.audios.is_empty() { Phase::Prefill } else { Phase::Encode };
        Ok(Seq {
            id,
            stops: StopMatcher::new(req.stop.clone()),
            history: prepared.ids.clone(),
            req,
            prepared,
            reserved,
            phase,
            cache,
            emb: None,
            audio: None,
            images: Vec::new(),
            audio_job: None,
            image_job: None,
            chunk: None,
            todo: None,
            filled: 0,
            long: false,
            sampler,
            detok: StreamDecoder::new(engine.tokenizer()),
            tokens: Vec::new(),
            infos: Vec::new(),
            text: String::new(),
            started: Instant::now(),
            first: None,
            prefill_s: 0.0,
            media_keys,
            keys: Vec::new(),
            cached: 0,
        })
    }

    /// Restores the longest cached prefix of the rows about to be prefilled — the prompt at
    /// admission, or prompt and output on the LongRoPE re-prefill (`with_outputs`; the cache
    /// is already reset then) — and remembers their block keys so the blocks it computes can
    /// be kept. At least the last row is always prefilled (its logits are needed).
    pub fn restore(&mut self, engine: &Engine, pc: &mut PrefixCache, with_outputs: bool) -> Result<()> {
        let Some(media) = &self.media_keys else { return Ok(()) };
        let outputs: &[u32] = if with_outputs { &self.tokens } else { &[] };
        let rows = self.prepared.ids.len() + outputs.len();
        let long = engine.decoder().rope().is_long(rows);
        self.keys = pc.chain(&self.prepared.ids, outputs, media, self.adapter(), long);
        if !with_outputs {
            self.cache.reset(long);
        }
        let limit = self.limit();
        let got = pc.restore(&self.keys, (rows - 1) / pc.block(), &mut self.cache, limit)?;
        self.filled = got;
        if !with_outputs {
            self.cached = got;
        }
        Ok(())
    }

    /// What kind of piece this sequence runs next (pieces of a kind take about the same time;
    /// the scheduler learns how long): the media stage or prefill, the job's piece, the adapter.
    pub fn piece_kind(&self) -> usize {
        let p = &self.prepared;
        let adapter = self.adapter().map_or(0, |a| 1 + a as usize);
        match self.phase {
            Phase::Encode if !p.audios.is_empty() && self.audio.is_none() => self.audio_job.as_ref().map_or(0, |j| j.next_piece()),
            Phase::Encode => 3 + self.image_job.as_ref().map_or(0, |j| j.next_piece()),
            _ => 8 + 3 * adapter + self.chunk.as_ref().map_or(0, |j| j.next_piece()),
        }
    }

    pub fn adapter(&self) -> Option<Adapter> {
        self.prepared.mode.adapter()
    }

    /// The last sampled token (the next decode step's input).
    pub fn last_token(&self) -> Option<u32> {
        self.tokens.last().copied()
    }

    /// Runs the next piece of media encoding: the audios first (encoded together, as the
    /// reference batches them), then each image; media found in the media cache are taken
    /// on the way without a piece. When all are there, merges them into the embeddings.
    pub fn encode_piece(&mut self, engine: &Engine, pc: &mut PrefixCache, events: &mut Vec<Event>) -> Result<()> {
        loop {
            let p = &self.prepared;
            let ran = if !p.audios.is_empty() && self.audio.is_none() {
                self.audio_piece(engine, pc, events)?
            } else if self.images.len() < p.images.len() {
                self.image_piece(engine, pc, events)?
            } else {
                true
            };
            if ran {
                break;
            }
        }
        let p = &self.prepared;
        if (p.audios.is_empty() || self.audio.is_some()) && self.images.len() == p.images.len() {
            self.emb = Some(engine.merge_media(p, self.audio.as_ref(), &self.images)?);
            self.audio = None;
            self.images.clear();
            self.phase = Phase::Prefill;
        }
        Ok(())
    }

    /// A piece of the audios' encoding; false when they came from the media cache instead.
    fn audio_piece(&mut self, engine: &Engine, pc: &mut PrefixCache, events: &mut Vec<Event>) -> Result<bool> {
        let (id, p) = (self.id, &self.prepared);
        let key = self.media_keys.as_ref().and_then(|m| m.audio);
        if self.audio_job.is_none() {
            if let Some(feats) = pc.media_get(key) {
                self.audio = Some(feats);
                events.push(Event::Progress { id, stage: Stage::Audio, done: 1, total: 1 });
                return Ok(false);
            }
        }
        let job = match &mut self.audio_job {
            Some(j) => j,
            None => self.audio_job.insert(engine.start_audios(p)?),
        };
        let before = job.windows().0;
        let out = engine.advance_audios(p, job)?;
        let (done, total) = job.windows();
        if done > before {
            events.push(Event::Progress { id, stage: Stage::Audio, done, total });
        }
        if let Some(feats) = out {
            pc.media_keep(key, &feats);
            self.audio = Some(feats);
            self.audio_job = None;
        }
        Ok(true)
    }

    /// A piece of the next image's encoding; false when it came from the media cache instead.
    fn image_piece(&mut self, engine: &Engine, pc: &mut PrefixCache, events: &mut Vec<Event>) -> Result<bool> {
        let (id, p) = (self.id, &self.prepared);
        let i = self.images.len();
        let key = self.media_keys.as_ref().and_then(|m| m.images.get(i)).map(|k| k.0);
        let img = &p.images[i];
        // Crops of the images before this one, and of all.
        let before: usize = p.images[..i].iter().map(|m| 1 + m.crops()).sum();
        let total: usize = p.images.iter().map(|m| 1 + m.crops()).sum();
        if self.image_job.is_none() {
            if let Some(feats) = pc.media_get(key) {
                self.images.push(feats);
                events.push(Event::Progress { id, stage: Stage::Images, done: before + 1 + img.crops(), total });
                return Ok(false);
            }
        }
        let job = match &mut self.image_job {
            Some(j) => j,
            None => self.image_job.insert(engine.start_image(img)?),
        };
        let was = job.crops_done(img).0;
        let out = engine.advance_image(img, job)?;
        let now = job.crops_done(img).0;
        if now > was {
            events.push(Event::Progress { id, stage: Stage::Images, done: before + now, total });
        }
        if let Some(feats) = out {
            pc.media_keep(key, &feats);
            self.images.push(feats);
            self.image_job = None;
        }
        Ok(true)
    }

    /// Runs the next piece of the prefill of up to `budget` rows (a third of a block; a chunk is
    /// started when none is in flight). A finished full block is kept in the prefix cache
    /// while `room` budget positions allow. After the last row samples the first (or, after a
    /// re-prefill, the next) token. True when that token ended the sequence.
    pub fn prefill(&mut self, engine: &Engine, budget: usize, pc: &mut PrefixCache, room: usize, events: &mut Vec<Event>) -> Result<bool> {
        let dec = engine.decoder();
        if self.todo.is_none() {
            let emb = match self.emb.take() {
                Some(e) => e,
                None => engine.merge_media(&self.prepared, None, &[])?,
            };
            self.long = dec.rope().is_long(emb.dim(0)?);
            self.todo = Some(emb.clone());
            self.emb = Some(emb);
            // A prefix restored at admission is already in the cache.
            if self.cache.is_empty() {
                self.cache.reset(self.long);
            }
            self.filled = self.cache.len();
        }
        let todo = self.todo.clone().ok_or_else(|| crate::Error::Request("nothing to prefill".into()))?;
        let total = todo.dim(0)?;
        let adapter = self.adapter();
        let job = match &mut self.chunk {
            Some(j) => j,
            None => {
                let len = budget.max(1).min(total - self.filled);
                self.cache.reserve(self.filled + len, self.limit())?;
                let rows = todo.narrow(0, self.filled, len)?;
                self.chunk.insert(dec.prefill(&rows, &mut self.cache, adapter, self.long)?)
            }
        };
        let Some(h) = dec.advance(job, &mut self.cache)? else { return Ok(false) };
        let len = job.len();
        self.chunk = None;
        let depth = self.filled / pc.block();
        if len == pc.block() && self.filled.is_multiple_of(pc.block()) && depth < self.keys.len() {
            pc.keep(&self.keys[..=depth], &self.cache, room)?;
        }
        self.filled += len;
        events.push(Event::Progress { id: self.id, stage: Stage::Prompt, done: self.filled, total });
        if self.filled == total {
            self.todo = None;
            self.phase = Phase::Decode;
            if self.first.is_none() {
                self.prefill_s = self.started.elapsed().as_secs_f64();
            }
            let logits = dec.logits(&h)?;
            return self.take(engine, logits, events);
        }
        Ok(false)
    }

    /// Most positions the sequence can reach.
    fn limit(&self) -> usize {
        self.prepared.ids.len() + self.req.max_new_tokens
    }

    /// Before a decode step: makes room for one more position, or, when the sequence first
    /// grows past the LongRoPE threshold, turns it back to prefill: the cache (short-factor
    /// keys) is dropped and the whole sequence — prompt embeddings, media rows included, plus
    /// the output — is prefilled again with the long factors, exactly once (spec §2.5).
    pub fn prepare_step(&mut self, engine: &Engine) -> Result<bool> {
        let dec = engine.decoder();
        let total = self.prepared.ids.len() + self.tokens.len();
        if !self.cache.is_long() && dec.rope().is_long(total) {
            tracing::debug!(id = self.id, total, "sequence crossed the LongRoPE threshold: re-prefilling");
            let emb = self.emb.as_ref().ok_or_else(|| crate::Error::Request("prompt embeddings were dropped".into()))?;
            let out = dec.embed(&self.tokens)?;
            self.todo = Some(Tensor::cat(&[emb, &out], 0)?);
            self.filled = 0;
            self.long = true;
            self.cache.reset(true);
            self.phase = Phase::Prefill;
            return Ok(false);
        }
        self.cache.reserve(total, self.limit())?;
        Ok(true)
    }

    /// Samples from `logits` and streams the token; true when the sequence has ended (a
    /// `Done` event is then among `events`).
    pub fn take(&mut self, engine: &Engine, logits: Vec<f32>, events: &mut Vec<Event>) -> Result<bool> {
        let id = self.sampler.sample_output(&logits, &self.history, self.tokens.len());
        let (lp, top) = sampler::logprobs(&logits, id, self.req.top_logprobs);
        self.first.get_or_insert_with(Instant::now);
        self.tokens.push(id);
        self.history.push(id);
        let is_eos = !self.req.ignore_eos && engine.generation_config().eos_token_id.contains(&id);
        let (piece, hit_stop) = if is_eos { (String::new(), false) } else { self.stops.push(&self.detok.push(id)?) };
        self.text.push_str(&piece);
        let info = TokenInfo { id, logprob: lp, top };
        events.push(Event::Token {
            id: self.id,
            token: info.clone(),
            text: piece,
            logits: self.req.return_logits.then_some(logits),
        });
        self.infos.push(info);
        if is_eos || hit_stop {
            events.push(Event::Done { id: self.id, completion: self.finish(FinishReason::Stop)? });
            return Ok(true);
        }
        if self.tokens.len() >= self.req.max_new_tokens {
            events.push(Event::Done { id: self.id, completion: self.finish(FinishReason::Length)? });
            return Ok(true);
        }
        Ok(false)
    }

    /// The completion so far, with held-back text flushed unless a stop ended it.
    pub fn finish(&mut self, reason: FinishReason) -> Result<Completion> {
        if reason != FinishReason::Stop {
            let (tail, _) = self.stops.push(&self.detok.finish()?);
            self.text.push_str(&tail);
            self.text.push_str(&self.stops.finish());
        }
        let now = Instant::now();
        let decode_s = self.first.map_or(0.0, |f| (now - f).as_secs_f64());
        let n = self.prepared.ids.len();
        let decode_tokens = self.tokens.len().saturating_sub(1);
        Ok(Completion {
            cached_tokens: self.cached,
            text: std::mem::take(&mut self.text),
            prompt_tokens: self.prepared.ids.clone(),
            tokens: std::mem::take(&mut self.tokens),
            logprobs: std::mem::take(&mut self.infos),
            finish_reason: reason,
            mode: self.prepared.mode,
            timings: Timings {
                prefill_tokens: n,
                prefill_s: self.prefill_s,
                decode_tokens,
                decode_s,
                prefill_tok_s: n as f64 / self.prefill_s.max(1e-9),
                decode_tok_s: decode_tokens as f64 / decode_s.max(1e-9),
            },
        })
    }
}

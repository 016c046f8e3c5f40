//! `phi4mm bench --concurrency N`: N synthetic requests through the scheduler at once, and what
//! a server's users would see: aggregate and per-stream decode tok/s, time to first token and
//! inter-token latency (p50/p99), peak RSS. `--late KINDS` admits more requests once the
//! streams are decoding and reports the streams' inter-token latency while those are encoded
//! and prefilled (every gap that ends between the first late submission and the last late
//! request's first token), against the unloaded step time.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use phi4mm::engine::Prepared;
use phi4mm::{Engine, Event, GenerateRequest, MediaInput, Message, Mode, PromptInput, RequestId, Scheduler, SchedulerOptions};

use crate::common::peak_rss_bytes;

/// Tokens each `--late` request generates (they are there to be admitted, not to decode).
const LATE_TOKENS: usize = 4;

/// What each stream of a batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Synthetic prompt ids, no adapter.
    Text,
    /// Synthetic prompt ids decoded with the vision LoRA (an image request's decode).
    VisionLora,
    /// Synthetic prompt ids decoded with the speech LoRA (a transcription's decode).
    SpeechLora,
    /// The `--image` file with the model card's prompt (encoded for real).
    Image,
    /// The `--audio` file, transcribed (encoded for real).
    Audio,
}

impl Kind {
    pub fn parse_list(s: &str) -> Result<Vec<Kind>> {
        s.split(',')
            .filter(|k| !k.is_empty())
            .map(|k| match k.trim() {
                "text" => Ok(Kind::Text),
                "vision-lora" | "vision" => Ok(Kind::VisionLora),
                "speech-lora" | "speech" => Ok(Kind::SpeechLora),
                "image" => Ok(Kind::Image),
                "audio" => Ok(Kind::Audio),
                other => bail!("unknown --mix kind `{other}` (text, vision-lora, speech-lora, image, audio)"),
            })
            .collect()
    }
}

/// Settings of one batched run.
pub struct BatchBench<'a> {
    pub concurrency: usize,
    pub mix: Vec<Kind>,
    pub late: Vec<Kind>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub image: Option<&'a std::path::Path>,
    pub audio: Option<&'a std::path::Path>,
    pub opts: SchedulerOptions,
}

/// Deterministic pseudo-random ids from the base vocabulary (no special tokens).
pub fn synthetic_ids(n: usize, seed: u64) -> Vec<u32> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % 199_998) as u32
        })
        .collect()
}

impl BatchBench<'_> {
    fn request(&self, engine: &Engine, kind: Kind, seed: u64) -> Result<(GenerateRequest, Prepared)> {
        let mut req = GenerateRequest::new(PromptInput::Raw(String::new()));
        req.max_new_tokens = self.gen_tokens;
        req.ignore_eos = true;
        let text = |mode: Mode| {
            let mut p = Prepared::text(synthetic_ids(self.prompt_tokens, seed));
            p.mode = mode;
            p
        };
        let media = |prompt: &str, file: Option<&std::path::Path>, what: &str| -> Result<GenerateRequest> {
            let f = file.with_context(|| format!("--mix {what} needs --{what} FILE"))?;
            let mut r = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", prompt)]));
            r.max_new_tokens = self.gen_tokens;
            r.ignore_eos = true;
            if what == "image" {
                r.images = vec![MediaInput::Path(f.to_path_buf())];
            } else {
                r.audios = vec![MediaInput::Path(f.to_path_buf())];
            }
            Ok(r)
        };
        Ok(match kind {
            Kind::Text => (req, text(Mode::Text)),
            Kind::VisionLora => (req, text(Mode::Vision)),
            Kind::SpeechLora => (req, text(Mode::Speech)),
            Kind::Image => {
                let r = media("<|image_1|>What is shown in this image?", self.image, "image")?;
                let p = engine.prepare(&r)?;
                (r, p)
            }
            Kind::Audio => {
                let r = media("<|audio_1|>Transcribe the audio clip into text.", self.audio, "audio")?;
                let p = engine.prepare(&r)?;
                (r, p)
            }
        })
    }

    /// Runs the batch; the report as JSON.
    pub fn run(&self, engine: &Engine) -> Result<serde_json::Value> {
        anyhow::ensure!(self.concurrency > 0 && !self.mix.is_empty(), "--concurrency must be at least 1");
        let mut opts = self.opts.clone();
        opts.max_batch = self.concurrency + self.late.len();
        opts.max_queue = opts.max_batch;
        let mut sched = Scheduler::new(engine, opts);
        let mut kinds: HashMap<RequestId, Kind> = HashMap::new();
        let start = Instant::now();
        let mut submitted: HashMap<RequestId, Instant> = HashMap::new();
        for i in 0..self.concurrency {
            let kind = self.mix[i % self.mix.len()];
            let (req, prep) = self.request(engine, kind, i as u64)?;
            let id = sched.submit_prepared(req, prep)?;
            kinds.insert(id, kind);
            submitted.insert(id, Instant::now());
        }
        let streams: Vec<RequestId> = kinds.keys().copied().collect();
        let mut rec = Record::default();
        // Prepared up front: decoding and resampling the media is not the scheduler's work.
        let mut late = Vec::new();
        for (j, &kind) in self.late.iter().enumerate() {
            let (mut req, prep) = self.request(engine, kind, 1000 + j as u64)?;
            req.max_new_tokens = LATE_TOKENS;
            late.push((kind, req, prep));
        }
        let mut late_ids = Vec::new();
        while !sched.is_idle() {
            if !late.is_empty() && streams.iter().all(|id| rec.tokens.get(id).map_or(0, Vec::len) >= 4) {
                for (kind, req, prep) in late.drain(..) {
                    let id = sched.submit_prepared(req, prep)?;
                    kinds.insert(id, kind);
                    submitted.insert(id, Instant::now());
                    late_ids.push(id);
                }
            }
            let quiet = sched.preparing() == 0 && sched.queued() == 0;
            let t = Instant::now();
            let events = sched.step();
            rec.step(t, &events, quiet && sched.running() >= self.concurrency, self.concurrency)?;
        }
        Ok(rec.report(self, &streams, &late_ids, &submitted, start.elapsed().as_secs_f64()))
    }
}

/// What the steps did.
#[derive(Default)]
struct Record {
    /// Per request, the time of each token.
    tokens: HashMap<RequestId, Vec<Instant>>,
    /// Steps where exactly the streams decoded and nothing waited or prepared: (seconds, tokens).
    pure: Vec<(f64, usize)>,
}

impl Record {
    /// `quiet`: nothing was waiting or preparing when the step began.
    fn step(&mut self, t: Instant, events: &[Event], quiet: bool, n: usize) -> Result<()> {
        let dt = t.elapsed().as_secs_f64();
        let mut toks = 0;
        for e in events {
            match e {
                Event::Token { id, .. } => {
                    toks += 1;
                    self.tokens.entry(*id).or_default().push(Instant::now());
                }
                Event::Failed { id, error } => bail!("request {id} failed: {error}"),
                _ => {}
            }
        }
        if quiet && toks == n {
            self.pure.push((dt, toks));
        }
        Ok(())
    }

    fn report(&self, b: &BatchBench<'_>, streams: &[RequestId], late: &[RequestId], submitted: &HashMap<RequestId, Instant>, wall: f64) -> serde_json::Value {
        let (secs, toks) = self.pure.iter().fold((0.0, 0), |a, p| (a.0 + p.0, a.1 + p.1));
        let aggregate = toks as f64 / secs.max(1e-9);
        let ttft: Vec<f64> = streams
            .iter()
            .filter_map(|id| Some((*self.tokens.get(id)?.first()? - *submitted.get(id)?).as_secs_f64()))
            .collect();
        let itl: Vec<f64> = streams
            .iter()
            .filter_map(|id| self.tokens.get(id))
            .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect::<Vec<_>>())
            .collect();
        let unloaded = median(self.pure.iter().map(|p| p.0).collect());
        // The streams' gaps that end while a late request is still preparing: after the first
        // was submitted, up to the last one's first token.
        let from = late.iter().filter_map(|id| submitted.get(id)).min();
        let to = late.iter().filter_map(|id| self.tokens.get(id)?.first()).max();
        let loaded: Vec<f64> = match (from, to) {
            (Some(&from), Some(&to)) => streams
                .iter()
                .filter_map(|id| self.tokens.get(id))
                .flat_map(|t| t.windows(2).filter(|w| w[1] > from && w[1] <= to).map(|w| (w[1] - w[0]).as_secs_f64()).collect::<Vec<_>>())
                .collect(),
            _ => Vec::new(),
        };
        // And after (at a longer context than while admitting: a conservative reference).
        let after: Vec<f64> = match to {
            Some(&to) => streams
                .iter()
                .filter_map(|id| self.tokens.get(id))
                .flat_map(|t| t.windows(2).filter(|w| w[0] > to).map(|w| (w[1] - w[0]).as_secs_f64()).collect::<Vec<_>>())
                .collect(),
            None => Vec::new(),
        };
        serde_json::json!({
            "concurrency": b.concurrency,
            "mix": format!("{:?}", b.mix),
            "late": format!("{:?}", b.late),
            "prompt_tokens": b.prompt_tokens,
            "gen_tokens": b.gen_tokens,
            "aggregate_decode_tok_s": aggregate,
            "per_stream_decode_tok_s": aggregate / b.concurrency as f64,
            "unloaded_step_s": unloaded,
            "ttft_s_p50": percentile(&ttft, 0.5),
            "ttft_s_p99": percentile(&ttft, 0.99),
            "itl_s_p50": percentile(&itl, 0.5),
            "itl_s_p99": percentile(&itl, 0.99),
            "late_ttft_s": late.iter().filter_map(|id| Some((*self.tokens.get(id)?.first()? - *submitted.get(id)?).as_secs_f64())).collect::<Vec<_>>(),
            "itl_while_admitting_s_p50": percentile(&loaded, 0.5),
            "itl_while_admitting_s_p99": percentile(&loaded, 0.99),
            "itl_while_admitting_s_max": loaded.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
            "itl_while_admitting_gaps": loaded.len(),
            "itl_after_admitting_s_p50": percentile(&after, 0.5),
            "wall_s": wall,
            "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / 1048576.0),
        })
    }
}

fn median(v: Vec<f64>) -> Option<f64> {
    percentile(&v, 0.5)
}

/// The `q` quantile (nearest rank) of `v`, or none when empty.
fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

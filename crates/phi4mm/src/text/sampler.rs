//! Picking the next token from logits: greedy by default (the generation config has no
//! sampling settings), or seeded sampling. The logits are adjusted in this order: the allowed
//! token mask (a grammar's), the repetition penalty (transformers' rule, over prompt and
//! output), the presence and frequency penalties (OpenAI's rule, over the output only), the
//! logit bias; then temperature, top-k, top-p and min-p (transformers' order of warpers).
//! Also the per-token log-probabilities (of the raw logits).

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How to choose tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// > 1 discourages tokens already in the sequence; 1 disables it.
    pub repetition_penalty: f32,
    /// Drop tokens whose probability is below `min_p` × the best one's; 0 disables it.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated (-2..2).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every generated token (-2..2).
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens (-100..100; -100 bans a token).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values that have no meaning.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Request(m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a finite number > 0");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::Request(format!("{name} must be between -2 and 2, got {v}")));
            }
        }
        if let Some((t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(Error::Request(format!("logit_bias of token {t} must be between -100 and 100, got {b}")));
        }
        Ok(())
    }
}

/// A per-step restriction of the next token (a grammar's allowed set): called with the tokens
/// generated so far, it sets `allowed[t] = false` for every token `t` that may not come next.
/// Starts all-true each step. When it allows nothing, the sampler falls back to the raw logits
/// (so a broken grammar cannot hang a request) and the caller is expected to end it.
pub trait TokenMask: Send {
    fn allowed(&mut self, generated: &[u32], allowed: &mut [bool]);
}

/// A shared [`TokenMask`] (requests are cloned; the mask's state is behind the mutex).
#[derive(Clone)]
pub struct MaskHook(pub Arc<std::sync::Mutex<dyn TokenMask>>);

impl std::fmt::Debug for MaskHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskHook")
    }
}

/// A sampler with its own seeded random generator.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    mask: Option<MaskHook>,
    allowed: Vec<bool>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng, mask: None, allowed: Vec::new() })
    }

    /// Restricts every step to the tokens `mask` allows.
    pub fn with_mask(mut self, mask: Option<MaskHook>) -> Self {
        self.mask = mask;
        self
    }

    /// Picks a token from `logits`; `history` is every id so far (prompt and generated) and
    /// its last `generated` ids are this request's output.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_output(logits, history, 0)
    }

    /// [`Sampler::sample`] with the last `generated` ids of `history` the output so far (the
    /// presence and frequency penalties and the mask see only those).
    pub fn sample_output(&mut self, logits: &[f32], history: &[u32], generated: usize) -> u32 {
        let mut l = logits.to_vec();
        let output = &history[history.len().saturating_sub(generated)..];
        self.apply_mask(output, &mut l);
        self.adjust(&mut l, history, output);
        self.pick(l)
    }

    /// Sets the logits the mask forbids to -inf (unless it forbids everything).
    fn apply_mask(&mut self, output: &[u32], l: &mut [f32]) {
        let Some(mask) = &self.mask else { return };
        self.allowed.clear();
        self.allowed.resize(l.len(), true);
        if let Ok(mut m) = mask.0.lock() {
            m.allowed(output, &mut self.allowed);
        }
        if self.allowed.iter().any(|&a| a) {
            l.iter_mut().zip(&self.allowed).filter(|(_, &a)| !a).for_each(|(x, _)| *x = f32::NEG_INFINITY);
        }
    }

    /// Penalties and bias.
    fn adjust(&self, l: &mut [f32], history: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in history {
                if seen.insert(t) {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x = if *x > 0.0 {
                            *x / p.repetition_penalty
                        } else {
                            *x * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::BTreeMap::new();
            output.iter().for_each(|&t| *counts.entry(t).or_insert(0u32) += 1);
            for (t, c) in counts {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
    }

    /// Greedy or seeded sampling from adjusted logits.
    fn pick(&mut self, l: Vec<f32>) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(&l);
        }
        // Candidates sorted by logit, best first.
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.truncate(p.top_k);
        }
        let max = l[idx[0] as usize] / p.temperature;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i as usize] / p.temperature - max) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (k, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = k + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        if p.min_p > 0.0 {
            // probs is sorted, best first: keep those ≥ min_p × the best (at least one).
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (k, &q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return idx[k];
            }
        }
        idx[probs.len() - 1]
    }
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

/// One candidate token with its log-probability.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// The model's log-probability of `chosen` and its `k` most likely tokens (raw logits,
/// before any sampling adjustment).
pub fn logprobs(logits: &[f32], chosen: u32, k: usize) -> (f32, Vec<TokenLogprob>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut top: Vec<u32> = Vec::with_capacity(k + 1);
    for (i, &x) in logits.iter().enumerate() {
        if top.len() < k || top.last().is_some_and(|&t| x > logits[t as usize]) {
            let pos = top.partition_point(|&t| logits[t as usize] >= x);
            top.insert(pos, i as u32);
            top.truncate(k);
        }
    }
    let chosen_lp = logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |_| lp(chosen as usize));
    let top = top
        .into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: lp(id as usize),
        })
        .collect();
    (chosen_lp, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() -> crate::error::Result<()> {
        let mut s = Sampler::new(SamplingParams::default())?;
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0], &[]), 1);
        Ok(())
    }

    #[test]
    fn repetition_penalty_follows_transformers() -> crate::error::Result<()> {
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(p)?;
        // Token 1 (logit 3, seen) drops to 1.5 < 2.
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2);
        // A negative seen logit gets more negative.
        assert_eq!(s.sample(&[-1.0, -0.6, -3.0], &[1]), 0);
        Ok(())
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() -> crate::error::Result<()> {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 1.0, top_k: 3, seed: 7, ..Default::default() };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone())?;
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        let mut s = Sampler::new(p)?;
        let b: Vec<u32> = (0..20).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(a, b);
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        assert!(a.iter().all(|&t| logits[t as usize] == max));
        Ok(())
    }

    #[test]
    fn top_p_keeps_the_nucleus() -> crate::error::Result<()> {
        let logits = [10.0f32, 0.0, 0.0, 0.0];
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, seed: 1, ..Default::default() };
        let mut s = Sampler::new(p)?;
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 0));
        Ok(())
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() -> crate::error::Result<()> {
        let (lp, top) = logprobs(&[0.0, 1.0, 2.0, -1.0], 1, 2);
        assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 1]);
        let total: f32 = [0.0f32, 1.0, 2.0, -1.0].iter().map(|x| x.exp()).sum();
        assert!((lp - (1.0f32.exp() / total).ln()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn presence_frequency_and_bias_follow_openai() -> crate::error::Result<()> {
        // Output so far: token 0 twice: 3 − (0.5 + 2×0.6) = 1.3 falls below token 1's 1.5.
        let p = SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.6, ..Default::default() };
        let mut s = Sampler::new(p)?;
        assert_eq!(s.sample_output(&[3.0, 1.5, 0.0], &[2, 0, 0], 2), 1);
        // The same ids in the prompt only are not penalised.
        assert_eq!(s.sample_output(&[3.0, 1.5, 0.0], &[0, 0, 2], 1), 0);
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(2, 5.0)], ..Default::default() })?;
        assert_eq!(s.sample(&[3.0, 1.5, 0.0], &[]), 2);
        Ok(())
    }

    #[test]
    fn min_p_and_the_mask_restrict_the_candidates() -> crate::error::Result<()> {
        let logits = [2.0f32, 1.9, -5.0, 0.0];
        let p = SamplingParams { temperature: 1.0, min_p: 0.5, seed: 3, ..Default::default() };
        let mut s = Sampler::new(p)?;
        assert!((0..100).all(|_| s.sample(&logits, &[]) < 2));
        struct OnlyThree;
        impl TokenMask for OnlyThree {
            fn allowed(&mut self, _: &[u32], allowed: &mut [bool]) {
                allowed.iter_mut().enumerate().for_each(|(i, a)| *a = i == 3);
            }
        }
        let hook = MaskHook(Arc::new(std::sync::Mutex::new(OnlyThree)));
        let mut s = Sampler::new(SamplingParams::default())?.with_mask(Some(hook));
        assert_eq!(s.sample(&logits, &[]), 3);
        Ok(())
    }

    #[test]
    fn invalid_params_are_rejected() -> crate::error::Result<()> {
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        Ok(())
    }
}

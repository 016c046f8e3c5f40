//! Picking the next token from logits: greedy by default (the generation config has no
//! sampling settings), or seeded sampling with repetition penalty, temperature, top-k and top-p
//! applied in that order (transformers' order). Also the per-token log-probabilities.

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
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
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
        Ok(())
    }
}

/// A sampler with its own seeded random generator.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Picks a token from `logits`; `history` is every id so far (prompt and generated).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut l = logits.to_vec();
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
    fn invalid_params_are_rejected() -> crate::error::Result<()> {
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        Ok(())
    }
}

//! AdamW as `torch.optim.AdamW` computes it (its single-tensor path), the factor of global
//! grad-norm clipping as `torch.nn.utils.clip_grad_norm_`, and the linear warmup-then-decay schedule of
//! transformers' `get_linear_schedule_with_warmup`.
//!
//! Hand-written rather than `candle_nn::optim::AdamW`: that one keeps its moments private (no
//! resume from a saved step) and orders the arithmetic differently from torch.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The optimizer's settings (the official recipes' values by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// lr 4e-5, β (0.9, 0.95), eps 1e-7, weight decay 0.01.
    fn default() -> Self {
        AdamWConfig { lr: 4e-5, beta1: 0.9, beta2: 0.95, eps: 1e-7, weight_decay: 0.01 }
    }
}

/// Moments of every parameter, in the parameters' order.
#[derive(Debug, Clone, Default)]
pub struct AdamW {
    /// Updates done so far.
    pub t: usize,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for parameters of these sizes.
    pub fn new(sizes: &[usize]) -> Self {
        AdamW { t: 0, m: sizes.iter().map(|&n| vec![0.0; n]).collect(), v: sizes.iter().map(|&n| vec![0.0; n]).collect() }
    }

    /// Parameter `i`'s part of update [`AdamW::t`] (counted from 1; the caller advances it once
    /// per update) with its gradient `g` at learning rate `lr`.
    pub fn update(&mut self, i: usize, cfg: &AdamWConfig, lr: f64, p: &mut [f32], g: &[f32]) -> Result<()> {
        let (Some(m), Some(v)) = (self.m.get_mut(i), self.v.get_mut(i)) else {
            return Err(Error::Request(format!("optimizer state has {} parameters, not {}", self.m.len(), i + 1)));
        };
        if g.len() != p.len() || m.len() != p.len() {
            return Err(Error::Request("a gradient does not match its parameter's size".into()));
        }
        let t = self.t.max(1) as i32;
        // torch computes these in Python floats (f64), then applies them to f32 tensors.
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2_sqrt = ((1.0 - cfg.beta2.powi(t)).sqrt()) as f32;
        let (decay, step_size) = ((1.0 - lr * cfg.weight_decay) as f32, (lr / bc1) as f32);
        let (b1w, b2, b2w, eps) = ((1.0 - cfg.beta1) as f32, cfg.beta2 as f32, (1.0 - cfg.beta2) as f32, cfg.eps as f32);
        p.par_iter_mut().zip(m.par_iter_mut()).zip(v.par_iter_mut()).zip(g.par_iter()).with_min_len(1 << 14).for_each(|(((p, m), v), &g)| {
            *p *= decay;
            *m += b1w * (g - *m); // lerp
            *v = *v * b2 + b2w * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p -= step_size * (*m / denom);
        });
        Ok(())
    }
}

/// torch's `clip_grad_norm_` for a global gradient norm `norm`: the factor every gradient is
/// multiplied by, `max_norm / (norm + 1e-6)` clamped to 1 (applied always). Returns
/// `(norm, factor)`.
pub fn clip_coef(norm: f64, max_norm: f64) -> (f64, f32) {
    (norm, (max_norm / (norm + 1e-6)).min(1.0) as f32)
}

/// The learning rate of update `step` (0-based) of `total`: linear warmup from 0 over
/// `warmup` updates, then linear decay to 0 at `total`.
pub fn linear_schedule(lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return lr * step as f64 / warmup.max(1) as f64;
    }
    lr * (total.saturating_sub(step) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lr = |s| linear_schedule(1.0, s, 2, 6);
        assert_eq!([lr(0), lr(1), lr(2), lr(4), lr(6)], [0.0, 0.5, 1.0, 0.5, 0.0]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        assert_eq!(clip_coef(5.0, 1.0), (5.0, (1.0 / (5.0 + 1e-6)) as f32));
        assert_eq!(clip_coef(0.5, 1.0).1, 1.0);
    }

    #[test]
    fn first_step_moves_by_the_learning_rate() {
        // Step 1 of Adam: m̂ = g, v̂ = g², so each weight moves by lr·g/(|g| + eps) (plus decay).
        let cfg = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
        let mut opt = AdamW::new(&[2]);
        opt.t = 1;
        let mut p = vec![1.0f32, 1.0];
        opt.update(0, &cfg, 0.1, &mut p, &[2.0, -0.5]).unwrap();
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6, "{p:?}");
    }
}

//! Element-wise functions candle computes one libm call at a time on the CPU: here a
//! polynomial `exp` the compiler vectorises, over chunks split across the threads.
//! Used for SigLIP's tanh GELU (30 M values per layer for a 7-crop image: image encode 51 → 37 s)
//! and SigLIP's attention softmax. (The decoder keeps candle's softmax: over a 4090-token prompt
//! the tiny parity model amplified the different rounding to 3e-4 in the logits, beyond the
//! 1e-4 parity tolerance.)

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;

/// `e^v` for f32 (relative error below 3e-7; 0 below −87, where f32 turns subnormal;
/// clamped at 88).
#[inline(always)]
pub fn exp(v: f32) -> f32 {
    let tiny = v < -87.0;
    let v = v.clamp(-87.0, 88.0);
    let n = (v * std::f32::consts::LOG2_E).round();
    // v − n·ln 2 in two parts (Cody–Waite) so r keeps its precision.
    let r = v - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let e = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if tiny {
        0.0
    } else {
        e
    }
}

/// GELU with the tanh approximation (PyTorch `gelu(approximate="tanh")`).
#[inline(always)]
fn gelu_tanh_one(x: f32) -> f32 {
    let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
    // tanh(u) = 1 − 2 / (e^{2u} + 1); exact ±1 where e^{2u} saturates.
    let t = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + t)
}

/// `f` over every element, in chunks split over the threads when there are many (a
/// prefill's activations; a decode row stays on the calling thread).
pub(crate) fn map_chunks<A: Copy + Sync, B: Copy + Default + Send>(x: &[A], f: impl Fn(A) -> B + Sync) -> Vec<B> {
    const CHUNK: usize = 1 << 14;
    let mut out = vec![B::default(); x.len()];
    let one = |(o, x): (&mut [B], &[A])| {
        for (o, &v) in o.iter_mut().zip(x) {
            *o = f(v);
        }
    };
    if x.len() < 2 * CHUNK {
        one((&mut out, x));
    } else {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(one);
    }
    out
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.shape().elem_count();
        let off = l.start_offset();
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(map_chunks(&v[off..off + n], gelu_tanh_one)),
            CpuStorage::BF16(v) => {
                CpuStorage::BF16(map_chunks(&v[off..off + n], |x| bf16::from_f32(gelu_tanh_one(x.to_f32()))))
            }
            _ => candle_core::bail!("gelu-tanh: f32 or bf16 only"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// Folds `x` with `f` over 16 interleaved partial results, then folds those.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = acc.iter().fold(init, |a, &b| f(a, b));
    for &v in chunks.remainder() {
        r = f(r, v);
    }
    r
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.shape().elem_count();
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let off = l.start_offset();
        let CpuStorage::F32(v) = s else { candle_core::bail!("softmax: f32 only") };
        let mut out = vec![0f32; n];
        let rows_per_task = (1 << 14) / d + 1;
        out.par_chunks_mut(rows_per_task * d).zip(v[off..off + n].par_chunks(rows_per_task * d)).for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                // Separate passes with 16 partial results each, so every loop vectorises.
                let max = lanes(x, f32::NEG_INFINITY, f32::max);
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = exp(x - max);
                }
                let inv = 1.0 / lanes(o, 0.0, |a, b| a + b);
                for o in o.iter_mut() {
                    *o *= inv;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Softmax over the last axis (f32 on the CPU with the polynomial `exp`; anything else through
/// candle). A row that is all −∞ gives NaN, as PyTorch's does.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&Softmax)?)
}

/// Tanh-approximation GELU, computed in f32 (bf16 input → bf16 output).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Ok(x.gelu()?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&GeluTanh)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_and_gelu_match_libm() -> crate::error::Result<()> {
        for i in -1740..=1760 {
            let v = i as f32 * 0.05;
            let (a, b) = (exp(v), v.exp());
            assert!((a - b).abs() <= 3e-7 * b, "exp({v}) = {a} vs {b}");
        }
        assert_eq!(exp(-200.0), 0.0);
        let s = Tensor::randn(0f32, 3.0, (5, 77), &Device::Cpu)?;
        let ours: Vec<f32> = softmax_last_dim(&s)?.flatten_all()?.to_vec1()?;
        let want: Vec<f32> = candle_nn::ops::softmax_last_dim(&s)?.flatten_all()?.to_vec1()?;
        for (a, b) in ours.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6, "softmax {a} vs {b}");
        }
        let x = Tensor::arange(-600i64, 600, &Device::Cpu)?.to_dtype(DType::F32)?;
        let x = (x * 0.01)?;
        let ours: Vec<f32> = gelu_tanh(&x)?.to_vec1()?;
        let want: Vec<f32> = x.gelu()?.to_vec1()?;
        for (a, b) in ours.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        Ok(())
    }
}

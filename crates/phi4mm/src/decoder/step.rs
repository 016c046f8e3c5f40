//! Single-token decode on the CPU without tensors: the same blocks as [`Decoder::forward`]
//! over one position, on f32 buffers that live from token to token (one set per thread), so a
//! step allocates nothing per layer and runs no single-threaded tensor op. Every result is
//! rounded to the activation dtype where the tensor path rounds it (each bf16 op of candle
//! rounds its output), so both paths give the same numbers up to the order of f32 sums.
//!
//! Per layer: RMSNorm → qkv (+LoRA) → RoPE on q and k → cache write → attention over the cache
//! → o_proj → residual → RMSNorm → gate_up → SiLU(gate)·up → down → residual.

use std::cell::RefCell;

use candle_core::{DType, Tensor};

use super::{Decoder, RmsNorm};
use crate::error::Result;
use crate::kernels::team;
use crate::kv_cache::KvCache;
use crate::lora::{Adapter, LoraScratch};
use crate::quant::{Act, Bf16Act, F32Act};

/// The buffers of one step (sizes in the shape comments are for one position).
#[derive(Debug, Default)]
struct Buffers {
    x: Vec<f32>,      // [hidden] residual stream
    xn: Vec<f32>,     // [hidden] normalised
    qkv: Vec<f32>,    // [(h + 2kv)·d]
    att: Vec<f32>,    // [h·d]
    proj: Vec<f32>,   // [hidden] o_proj / down_proj output
    gu: Vec<f32>,     // [2·inter]
    act: Vec<f32>,    // [inter]
    cos: Vec<f32>,    // [rotary/2]
    sin: Vec<f32>,    // [rotary/2]
    lora: LoraScratch,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}


impl RmsNorm {
    /// `x` `[dim]` → `out` `[dim]`, rounding as [`RmsNorm::forward`] does.
    fn apply<A: Act>(&self, x: &[f32], out: &mut [f32]) {
        let rd = A::round;
        let var = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let s = (var + self.eps as f32).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(&self.weight_f32) {
            *o = rd(rd(v / s) * w);
        }
    }
}

/// [`RmsNorm::apply`] in bf16 over the rows of a contiguous `[.., dim]` tensor: the tensor
/// path's norm on the CPU (one pass per row, rows over the threads; candle's op chain made
/// eight passes), so both paths share one definition.
pub(super) struct Bf16Norm<'a>(pub &'a RmsNorm);

impl candle_core::CustomOp1 for Bf16Norm<'_> {
    fn name(&self) -> &'static str {
        "rms-norm-bf16"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let dim = self.0.weight_f32.len();
        let candle_core::CpuStorage::BF16(v) = s else { candle_core::bail!("rms-norm-bf16: bf16 only") };
        if l.shape().dims().last() != Some(&dim) {
            candle_core::bail!("rms-norm-bf16: last axis of {:?} is not {dim}", l.shape().dims());
        }
        let x = &v[l.start_offset()..l.start_offset() + l.shape().elem_count()];
        let mut out = vec![half::bf16::ZERO; x.len()];
        let rows_per_task = (1 << 14) / dim.max(1) + 1;
        out.par_chunks_mut(rows_per_task * dim).zip(x.par_chunks(rows_per_task * dim)).for_each(|(o, x)| {
            let (mut xf, mut yf) = (vec![0f32; dim], vec![0f32; dim]);
            for (o, x) in o.chunks_mut(dim).zip(x.chunks(dim)) {
                xf.iter_mut().zip(x).for_each(|(f, b)| *f = b.to_f32());
                self.0.apply::<Bf16Act>(&xf, &mut yf);
                o.iter_mut().zip(&yf).for_each(|(b, &f)| *b = half::bf16::from_f32(f));
            }
        });
        Ok((candle_core::CpuStorage::BF16(out), l.shape().clone()))
    }
}

/// Rotates the first `rot` dims of each `d`-wide head in `x` (rotate-half pairing), as
/// candle's `rope` kernel does in the activation dtype.
fn rotate<A: Act>(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let rd = A::round;
    let half = cos.len();
    for head in x.chunks_mut(d) {
        for i in 0..half {
            let (a, b, c, s) = (head[i], head[i + half], cos[i], sin[i]);
            head[i] = rd(rd(a * c) - rd(b * s));
            head[i + half] = rd(rd(a * s) + rd(b * c));
        }
    }
}

/// SiLU as the prefill's `swiglu` computes it: in f32, rounded once to the dtype.
#[inline(always)]
fn silu<A: Act>(v: f32) -> f32 {
    A::round(crate::kernels::elementwise::silu_one(v))
}

impl Decoder {
    /// Whether [`Decoder::step`] runs with this cache.
    pub(super) fn can_step(&self, cache: &KvCache) -> bool {
        self.steppable && cache.can_attend()
    }

    /// One token: `embed` `[1, hidden]` at position `pos` (the cache holds `0..pos`) → the
    /// final normalised hidden state `[1, hidden]`.
    pub(super) fn step(&self, embed: &Tensor, pos: usize, long: bool, cache: &mut KvCache, adapter: Option<Adapter>) -> Result<Tensor> {
        let x0: Vec<f32> = embed.to_dtype(self.dtype)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        // The pool's other workers spin for the step's ~130 mat-vecs (see `kernels::team`;
        // no tensor op runs inside).
        let out = team::with_team(|| {
            if self.dtype == DType::BF16 {
                self.step_as::<Bf16Act>(&x0, pos, long, cache, adapter)
            } else {
                self.step_as::<F32Act>(&x0, pos, long, cache, adapter)
            }
        })?;
        Ok(Tensor::from_vec(out, (1, self.hidden), &self.device)?.to_dtype(self.dtype)?)
    }

    /// [`Decoder::step`] with activations rounded as `A`: embedding `x0` `[hidden]` → final
    /// normalised hidden state `[hidden]`.
    fn step_as<A: Act>(&self, x0: &[f32], pos: usize, long: bool, cache: &mut KvCache, adapter: Option<Adapter>) -> Result<Vec<f32>> {
        let rd = A::round;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let out = BUFFERS.with(|b| -> Result<Vec<f32>> {
            let mut b = b.borrow_mut();
            let b = &mut *b;
            let inter = self.layers.first().map_or(0, |l| l.mlp.inter);
            b.x.clear();
            b.x.extend_from_slice(x0);
            b.xn.resize(self.hidden, 0.0);
            b.proj.resize(self.hidden, 0.0);
            b.qkv.resize((h + 2 * kv) * d, 0.0);
            b.att.resize(h * d, 0.0);
            b.gu.resize(2 * inter, 0.0);
            b.act.resize(inter, 0.0);
            b.cos.clear();
            b.sin.clear();
            self.rope.push_cos_sin(pos, long, &mut b.cos, &mut b.sin);
            b.cos.iter_mut().chain(b.sin.iter_mut()).for_each(|v| *v = rd(*v));
            let scale = 1.0 / (d as f32).sqrt();
            for (i, layer) in self.layers.iter().enumerate() {
                // Attention.
                layer.input_layernorm.apply::<A>(&b.x, &mut b.xn);
                layer.self_attn.qkv_proj.matvec::<A>(&b.xn, adapter, &mut b.qkv, &mut b.lora)?;
                let (q, rest) = b.qkv.split_at_mut(h * d);
                let (k, v) = rest.split_at_mut(kv * d);
                rotate::<A>(q, d, &b.cos, &b.sin);
                rotate::<A>(k, d, &b.cos, &b.sin);
                cache.write_row(i, pos, k, v)?;
                cache.attend_into(i, q, h, pos + 1, scale, &mut b.att)?;
                b.att.iter_mut().for_each(|v| *v = rd(*v));
                layer.self_attn.o_proj.matvec::<A>(&b.att, adapter, &mut b.proj, &mut b.lora)?;
                for (x, &a) in b.x.iter_mut().zip(&b.proj) {
                    *x = rd(*x + a);
                }
                // MLP.
                layer.post_attention_layernorm.apply::<A>(&b.x, &mut b.xn);
                layer.mlp.gate_up_proj.matvec::<A>(&b.xn, adapter, &mut b.gu, &mut b.lora)?;
                let (gate, up) = b.gu.split_at(inter);
                for ((a, &g), &u) in b.act.iter_mut().zip(gate).zip(up) {
                    *a = rd(silu::<A>(g) * u);
                }
                layer.mlp.down_proj.matvec::<A>(&b.act, adapter, &mut b.proj, &mut b.lora)?;
                for (x, &m) in b.x.iter_mut().zip(&b.proj) {
                    *x = rd(*x + m);
                }
            }
            let mut out = vec![0f32; self.hidden];
            self.norm.apply::<A>(&b.x, &mut out);
            Ok(out)
        })?;
        Ok(out)
    }
}

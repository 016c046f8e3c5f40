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
use crate::decoder::kv_cache::KvCache;
use crate::decoder::lora::{Adapter, LoraBatch};
use crate::model::quant::{Act, Bf16Act, F32Act};

/// The buffers of one step of `B` rows (the shape comments are per row).
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
    lora: LoraBatch,
}

impl Buffers {
    fn resize(&mut self, b: usize, hidden: usize, qkv: usize, att: usize, inter: usize) {
        self.xn.resize(b * hidden, 0.0);
        self.proj.resize(b * hidden, 0.0);
        self.qkv.resize(b * qkv, 0.0);
        self.att.resize(b * att, 0.0);
        self.gu.resize(b * 2 * inter, 0.0);
        self.act.resize(b * inter, 0.0);
    }
}

/// One sequence's token in a batched decode step: its KV cache (holding positions
/// `0..cache.len()`, in the cache's LongRoPE mode) and the adapter of its mode.
pub struct DecodeRow<'a> {
    pub token: u32,
    pub cache: &'a mut KvCache,
    pub adapter: Option<Adapter>,
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
        let mut rows = [Row { pos, long, cache, adapter }];
        let out = team::with_team(|| self.step_rows(&x0, &mut rows))?;
        Ok(Tensor::from_vec(out, (1, self.hidden), &self.device)?.to_dtype(self.dtype)?)
    }

    /// The next token of every row in one step: the embeddings of `rows[i].token` → the
    /// logits `[vocab]` of each row. Every weight is read once for the whole batch (each
    /// adapter once for the rows of its mode) and attention runs per row on its own cache, so
    /// a row's logits are bit-identical to a step of that sequence alone. Caches must have
    /// room for one more position. Off the tensor-free path, each row runs on its own.
    pub fn decode_batch(&self, rows: &mut [DecodeRow<'_>]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let emb = self.embed(&ids)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        if !head.has_matvec() || !rows.iter().all(|r| self.can_step(r.cache)) {
            return rows
                .iter_mut()
                .enumerate()
                .map(|(i, r)| self.logits(&self.forward(&emb.narrow(0, i, 1)?, r.cache, r.adapter, None)?))
                .collect();
        }
        for r in rows.iter() {
            if let Some(a) = r.adapter.filter(|&a| !self.has_adapter(a)) {
                return Err(crate::error::Error::Request(format!("this checkpoint has no {} LoRA adapter", a.name())));
            }
        }
        let x0: Vec<f32> = emb.to_dtype(self.dtype)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut steps: Vec<Row<'_>> = rows
            .iter_mut()
            .map(|r| Row { pos: r.cache.len(), long: r.cache.is_long(), cache: &mut *r.cache, adapter: r.adapter })
            .collect();
        let b = steps.len();
        let logits = team::with_team(|| -> Result<Vec<f32>> {
            let h = self.step_rows(&x0, &mut steps)?;
            let mut l = vec![0f32; b * self.vocab];
            head.matmat(&h, b, &mut l, &mut crate::kernels::batch::BatchScratch::default())?;
            Ok(l)
        })?;
        for s in steps.iter_mut() {
            s.cache.set_len(s.pos + 1);
        }
        let round = self.dtype == DType::BF16;
        Ok(logits
            .chunks(self.vocab)
            .map(|l| l.iter().map(|&v| if round { Bf16Act::round(v) } else { v }).collect())
            .collect())
    }

    fn step_rows(&self, x0: &[f32], rows: &mut [Row<'_>]) -> Result<Vec<f32>> {
        if self.dtype == DType::BF16 {
            self.step_as::<Bf16Act>(x0, rows)
        } else {
            self.step_as::<F32Act>(x0, rows)
        }
    }

    /// The blocks over one position of each row, activations rounded as `A`: embeddings `x0`
    /// `[B, hidden]` → final normalised hidden states `[B, hidden]`.
    fn step_as<A: Act>(&self, x0: &[f32], rows: &mut [Row<'_>]) -> Result<Vec<f32>> {
        let rd = A::round;
        let (h, kv, d, hid) = (self.heads, self.kv_heads, self.head_dim, self.hidden);
        let n = rows.len();
        let adapters: Vec<Option<Adapter>> = rows.iter().map(|r| r.adapter).collect();
        let inter = self.layers.first().map_or(0, |l| l.mlp.inter);
        let (qkv_w, att_w) = ((h + 2 * kv) * d, h * d);
        BUFFERS.with(|b| -> Result<Vec<f32>> {
            let mut b = b.borrow_mut();
            let b = &mut *b;
            b.x.clear();
            b.x.extend_from_slice(x0);
            b.resize(n, hid, qkv_w, att_w, inter);
            b.cos.clear();
            b.sin.clear();
            for r in rows.iter() {
                self.rope.push_cos_sin(r.pos, r.long, &mut b.cos, &mut b.sin);
            }
            b.cos.iter_mut().chain(b.sin.iter_mut()).for_each(|v| *v = rd(*v));
            let half = b.cos.len() / n.max(1);
            let scale = 1.0 / (d as f32).sqrt();
            for (i, layer) in self.layers.iter().enumerate() {
                // Attention.
                norm_rows::<A>(&layer.input_layernorm, &b.x, &mut b.xn, hid);
                layer.self_attn.qkv_proj.matmat::<A>(&b.xn, &adapters, &mut b.qkv, &mut b.lora)?;
                for (j, r) in rows.iter_mut().enumerate() {
                    let (cos, sin) = (&b.cos[j * half..(j + 1) * half], &b.sin[j * half..(j + 1) * half]);
                    let (q, rest) = b.qkv[j * qkv_w..(j + 1) * qkv_w].split_at_mut(h * d);
                    let (k, v) = rest.split_at_mut(kv * d);
                    rotate::<A>(q, d, cos, sin);
                    rotate::<A>(k, d, cos, sin);
                    r.cache.write_row(i, r.pos, k, v)?;
                    let att = &mut b.att[j * att_w..(j + 1) * att_w];
                    r.cache.attend_into(i, q, h, r.pos + 1, scale, att)?;
                    att.iter_mut().for_each(|v| *v = rd(*v));
                }
                layer.self_attn.o_proj.matmat::<A>(&b.att, &adapters, &mut b.proj, &mut b.lora)?;
                for (x, &a) in b.x.iter_mut().zip(&b.proj) {
                    *x = rd(*x + a);
                }
                // MLP.
                norm_rows::<A>(&layer.post_attention_layernorm, &b.x, &mut b.xn, hid);
                layer.mlp.gate_up_proj.matmat::<A>(&b.xn, &adapters, &mut b.gu, &mut b.lora)?;
                for (gu, act) in b.gu.chunks(2 * inter).zip(b.act.chunks_mut(inter)) {
                    let (gate, up) = gu.split_at(inter);
                    for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
                        *a = rd(silu::<A>(g) * u);
                    }
                }
                layer.mlp.down_proj.matmat::<A>(&b.act, &adapters, &mut b.proj, &mut b.lora)?;
                for (x, &m) in b.x.iter_mut().zip(&b.proj) {
                    *x = rd(*x + m);
                }
            }
            let mut out = vec![0f32; n * hid];
            norm_rows::<A>(&self.norm, &b.x, &mut out, hid);
            Ok(out)
        })
    }
}

/// A row of [`Decoder::step_as`]: position, LongRoPE mode, cache and adapter.
struct Row<'a> {
    pos: usize,
    long: bool,
    cache: &'a mut KvCache,
    adapter: Option<Adapter>,
}

/// [`RmsNorm::apply`] to each `dim`-wide row.
fn norm_rows<A: Act>(norm: &RmsNorm, x: &[f32], out: &mut [f32], dim: usize) {
    for (x, o) in x.chunks(dim).zip(out.chunks_mut(dim)) {
        norm.apply::<A>(x, o);
    }
}

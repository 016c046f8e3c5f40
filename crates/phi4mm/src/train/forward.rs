//! The decoder's forward as differentiable candle ops, for training one LoRA adapter: the
//! same computation as [`crate::decoder::Decoder`] (spec §2–3), built only from ops whose
//! backward candle implements. candle's fused `rms_norm`, `softmax_last_dim` and `rope` have
//! none — `backward()` succeeds and the variables upstream silently get no gradient — so the
//! norm, the softmax and the rotation are written out here; the frozen projections go through
//! [`frozen_linear`], whose backward feeds the input only.

use candle_core::{DType, Tensor, Var, D};

use crate::decoder::{DecoderTensors, LayerTensors, ProjTensors};
use crate::error::Result;
use crate::kernels::frozen_linear;

/// A trained low-rank pair: `A` `[r, in]`, `B` `[out, r]` (f32 variables), `y += s·(x·Aᵀ)·Bᵀ`.
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// RMSNorm as the reference computes it: normalise in f32, cast back, multiply by the gain.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.to_dtype(x.dtype())?.broadcast_mul(w)?)
}

/// Softmax over the last dim; the subtracted maximum is a constant (softmax does not depend on
/// it), so no gradient is built through the max.
fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `log_softmax` over the last dim.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    Ok(shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?)
}

/// The partial rotate-half rotation of `x` `[heads, n, d]` (first `rot` dims).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Tensor> {
    let (half, d) = (rot / 2, x.dim(2)?);
    let x1 = x.narrow(2, 0, half)?;
    let x2 = x.narrow(2, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    if rot == d {
        return Ok(Tensor::cat(&[r1, r2], 2)?);
    }
    Ok(Tensor::cat(&[r1, r2, x.narrow(2, rot, d - rot)?], 2)?)
}

/// One projection: frozen base plus the trained pair, if this projection has one. The pair
/// runs in f32 on the f32 variables (no low-precision copy of them is kept for the backward).
fn project(x: &Tensor, p: &ProjTensors, lora: Option<&Lora>) -> Result<Tensor> {
    let y = frozen_linear(x, &p.base)?;
    let Some(l) = lora else { return Ok(y) };
    let low = x.to_dtype(DType::F32)?.matmul(&l.a.as_tensor().t()?)?;
    let delta = (low.matmul(&l.b.as_tensor().t()?)? * l.scale)?;
    Ok((y + delta.to_dtype(x.dtype())?)?)
}

/// Causal GQA self-attention of `h` `[n, hidden]` (positions `0..n`), in f32 like the engine.
fn attention(w: &DecoderTensors, h: &Tensor, qkv_w: &ProjTensors, o_w: &ProjTensors, loras: [Option<&Lora>; 2], cs: &(Tensor, Tensor)) -> Result<Tensor> {
    let (n, heads, kv, d) = (h.dim(0)?, w.heads, w.kv_heads, w.head_dim);
    let qkv = project(h, qkv_w, loras[0])?;
    let split = |off: usize, k: usize| -> Result<Tensor> { Ok(qkv.narrow(1, off, k * d)?.reshape((n, k, d))?.transpose(0, 1)?.to_dtype(DType::F32)?) };
    let rot = w.rope.rotary_dims();
    let q = rope(&split(0, heads)?, &cs.0, &cs.1, rot)?;
    let k = rope(&split(heads * d, kv)?, &cs.0, &cs.1, rot)?;
    let v = split((heads + kv) * d, kv)?;
    let group = heads / kv;
    let widen = |t: Tensor| -> Result<Tensor> { Ok(t.unsqueeze(1)?.broadcast_as((kv, group, n, d))?.contiguous()?.reshape((heads, n, d))?) };
    let (k, v) = (widen(k)?, widen(v)?);
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?;
    let mask: Vec<f32> = (0..n * n).map(|i| if i % n > i / n { f32::NEG_INFINITY } else { 0.0 }).collect();
    let scores = scores.broadcast_add(&Tensor::from_vec(mask, (n, n), h.device())?)?;
    let out = softmax(&scores)?.matmul(&v)?; // [heads, n, d]
    let out = out.transpose(0, 1)?.contiguous()?.reshape((n, heads * d))?.to_dtype(h.dtype())?;
    project(&out, o_w, loras[1])
}

/// One decoder block on `x` `[n, hidden]` with its trained pairs `lw`.
fn block(w: &DecoderTensors, l: &LayerTensors, lw: &[Option<Lora>; 4], x: &Tensor, cs: &(Tensor, Tensor)) -> Result<Tensor> {
    let h = rms_norm(x, &l.input_norm, w.eps)?;
    let x = (x + attention(w, &h, &l.proj[0], &l.proj[1], [lw[0].as_ref(), lw[1].as_ref()], cs)?)?;
    let h = rms_norm(&x, &l.post_norm, w.eps)?;
    let gu = project(&h, &l.proj[2], lw[2].as_ref())?;
    let inter = gu.dim(1)? / 2;
    let act = (gu.narrow(1, 0, inter)?.silu()? * gu.narrow(1, inter, inter)?)?;
    Ok((x + project(&act, &l.proj[3], lw[3].as_ref())?)?)
}

/// Final norm, tied LM head and the summed −log p of `targets` on the last rows of `x`.
fn head_nll(w: &DecoderTensors, x: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, k) = (x.dim(0)?, targets.len());
    let last = rms_norm(&x.narrow(0, n - k, k)?, &w.norm, w.eps)?;
    let logp = log_softmax(&frozen_linear(&last, &w.embed)?.to_dtype(DType::F32)?)?; // [k, vocab]
    let idx = Tensor::from_vec(targets.to_vec(), (k, 1), &w.device)?;
    Ok(logp.gather(&idx, 1)?.sum_all()?.neg()?)
}

fn tables(w: &DecoderTensors, n: usize) -> Result<(Tensor, Tensor)> {
    w.rope.cos_sin(0, n, w.rope.is_long(n), DType::F32, &w.device)
}

/// Sum over the target rows of −log p(target), forward only: `embeds` `[n, hidden]` are the
/// input rows (prompt with media merged, then the target but its last token), `targets` the
/// ids that rows `n − targets.len() ..` must predict. `loras[layer][proj]` are the trained pairs.
pub fn target_nll(w: &DecoderTensors, loras: &[[Option<Lora>; 4]], embeds: &Tensor, targets: &[u32]) -> Result<f64> {
    let cs = tables(w, embeds.dim(0)?)?;
    let mut x = embeds.clone();
    for (l, lw) in w.layers.iter().zip(loras) {
        x = block(w, l, lw, &x, &cs)?.detach();
    }
    Ok(head_nll(w, &x, targets)?.to_scalar::<f32>()? as f64)
}

/// `scale` × [`target_nll`] and its gradient for every trained pair, handed to `sink` as
/// (variable, f32 gradient). Checkpointed by block: the forward keeps only each block's input,
/// and the backward recomputes one block at a time (its graph, and so its activations, live only
/// while its gradient is taken), as `gradient_checkpointing` does in the official recipes.
pub fn nll_backward(w: &DecoderTensors, loras: &[[Option<Lora>; 4]], embeds: &Tensor, targets: &[u32], scale: f64, sink: &mut dyn FnMut(&Var, Tensor) -> Result<()>) -> Result<f64> {
    let cs = tables(w, embeds.dim(0)?)?;
    let mut inputs = Vec::with_capacity(w.layers.len());
    let mut x = embeds.clone();
    for (l, lw) in w.layers.iter().zip(loras) {
        let next = block(w, l, lw, &x, &cs)?.detach();
        inputs.push(std::mem::replace(&mut x, next));
    }
    let top = Var::from_tensor(&x)?;
    let nll = (head_nll(w, top.as_tensor(), targets)? * scale)?;
    let loss = nll.to_scalar::<f32>()? as f64;
    let mut grads = nll.backward()?;
    let mut gx = grads.remove(top.as_tensor()).ok_or_else(|| crate::error::Error::Request("no gradient reached the last block".into()))?;
    for ((l, lw), x) in w.layers.iter().zip(loras).zip(inputs).rev() {
        let input = Var::from_tensor(&x)?;
        let y = block(w, l, lw, input.as_tensor(), &cs)?;
        // d(Σ y·g)/dθ = gᵀ ∂y/∂θ: the block's share of the chain rule.
        let mut grads = (y.to_dtype(DType::F32)? * gx.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        for v in lw.iter().flatten().flat_map(|p| [&p.a, &p.b]) {
            if let Some(g) = grads.remove(v.as_tensor()) {
                sink(v, g)?;
            }
        }
        gx = grads.remove(input.as_tensor()).ok_or_else(|| crate::error::Error::Request("no gradient reached a block's input".into()))?;
    }
    Ok(loss)
}

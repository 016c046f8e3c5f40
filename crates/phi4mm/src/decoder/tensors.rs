//! The decoder's weights as plain tensors, for the trainer's differentiable forward
//! (`crate::train`): the same tensors the engine runs on, not a second copy; and an adapter's
//! pairs replaced by trained ones.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::lora::{Adapter, LoraLinear};
use super::rope::Rope;
use super::Decoder;
use crate::error::{Error, Result};
use crate::kernels::Matrix;

/// One projection: the frozen base weight `[out, in]` and, when the checkpoint has it, the
/// adapter's `A` `[r, in]`, `B` `[out, r]` and scale α/r.
#[derive(Debug, Clone)]
pub struct ProjTensors {
    pub base: Tensor,
    pub lora: Option<(Tensor, Tensor, f64)>,
}

/// One block: its two RMSNorm gains and the qkv, o, gate_up and down projections.
#[derive(Debug, Clone)]
pub struct LayerTensors {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub proj: [ProjTensors; 4],
}

/// The projections of a block, in [`LayerTensors::proj`] order, with their checkpoint names.
pub const PROJ_NAMES: [&str; 4] = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"];

/// Everything the forward needs.
#[derive(Debug, Clone)]
pub struct DecoderTensors {
    /// `[vocab, hidden]`, also the LM head (tied).
    pub embed: Tensor,
    pub layers: Vec<LayerTensors>,
    pub norm: Tensor,
    pub eps: f64,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Rope,
    pub dtype: DType,
    pub device: Device,
}

fn dense(m: &Matrix, what: &str) -> Result<Tensor> {
    match m {
        Matrix::Dense(t) => Ok(t.clone()),
        Matrix::Quant(q) => Err(Error::Request(format!("{what} is stored as {}; training needs the unquantised checkpoint (bf16 or f32)", q.qtype().name()))),
    }
}

fn proj(p: &LoraLinear, adapter: Adapter, what: &str) -> Result<ProjTensors> {
    let lora = match p.pair_opt(adapter) {
        Some(pair) => Some((dense(&pair.a, what)?, dense(&pair.b, what)?, pair.scale)),
        None => None,
    };
    Ok(ProjTensors { base: dense(&p.base, what)?, lora })
}

impl Decoder {
    /// Replaces `adapter` on every projection by the pairs in `tensors` (checkpoint names,
    /// `model.layers.{i}.{proj}.lora_{A,B}.{adapter}.weight`), scaled by `scale`. Every
    /// projection must be covered and every tensor used.
    pub fn set_adapter(&mut self, adapter: Adapter, tensors: &HashMap<String, Tensor>, scale: f64) -> Result<()> {
        let n = adapter.name();
        let dtype = self.dtype;
        let mut used = 0;
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (p, proj) in PROJ_NAMES.iter().zip(l.projections_mut()) {
                let get = |ab: &str| {
                    let name = format!("model.layers.{i}.{p}.lora_{ab}.{n}.weight");
                    tensors.get(&name).ok_or(Error::MissingTensor(name))
                };
                let (a, b) = (get("A")?, get("B")?);
                proj.set_pair(adapter, &a.to_device(&self.device)?, &b.to_device(&self.device)?, scale, dtype)?;
                used += 2;
            }
        }
        if used != tensors.len() {
            return Err(Error::Request(format!("the adapter has {} tensors but the decoder takes {used}", tensors.len())));
        }
        Ok(())
    }

    /// Frees `adapter` (a trainer that does not use it).
    pub fn drop_adapter(&mut self, adapter: Adapter) {
        for l in &mut self.layers {
            for p in l.projections_mut() {
                p.drop_pair(adapter);
            }
        }
    }

    /// The weights as tensors, with `adapter`'s pairs (errors on quantised weights or an
    /// untied LM head, which no Phi-4-multimodal checkpoint has).
    pub fn tensors(&self, adapter: Adapter) -> Result<DecoderTensors> {
        if self.lm_head.is_some() {
            return Err(Error::Request("training supports the tied LM head of Phi-4-multimodal only".into()));
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let name = |j: usize| format!("model.layers.{i}.{}", PROJ_NAMES[j]);
            let p = l.projections();
            layers.push(LayerTensors {
                input_norm: l.input_layernorm.weight.clone(),
                post_norm: l.post_attention_layernorm.weight.clone(),
                proj: [proj(p[0], adapter, &name(0))?, proj(p[1], adapter, &name(1))?, proj(p[2], adapter, &name(2))?, proj(p[3], adapter, &name(3))?],
            });
        }
        Ok(DecoderTensors {
            embed: dense(&self.embed_tokens, "model.embed_tokens.weight")?,
            layers,
            norm: self.norm.weight.clone(),
            eps: self.norm.eps,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope: self.rope.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }
}

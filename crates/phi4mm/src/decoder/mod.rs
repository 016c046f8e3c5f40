//! The Phi-4-mini text decoder (spec §2): token embedding, 32 pre-norm blocks of GQA attention
//! with partial LongRoPE and a SiLU-gated MLP, final RMSNorm and the tied LM head.
//! Follows `Phi4MultimodalModel` / `Phi3DecoderLayer` of transformers; the struct tree mirrors
//! the checkpoint's names (`model.layers.{i}.self_attn.qkv_proj`, …).
//!
//! The decoder sees only embeddings: media features are merged into them by the engine.

mod chunk;
pub mod kv_cache;
pub mod layers;
pub mod lora;
pub mod rope;

mod step;
mod tensors;

pub use chunk::Prefill;
use chunk::PIECES_PER_BLOCK;
pub use step::DecodeRow;
pub use tensors::{DecoderTensors, LayerTensors, ProjTensors, PROJ_NAMES};

use candle_core::{DType, Device, Tensor, D};

use crate::model::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::Matrix;
use crate::decoder::kv_cache::{KvCache, KvFormat};
use crate::decoder::lora::{Adapter, LoraLinear};
use crate::model::quant::QType;
use rope::Rope;
use crate::model::weights::{Scope, Weights};

/// Named intermediate tensors collected during a forward call (for parity checks).
pub type Taps = Vec<(String, Tensor)>;

/// RMSNorm: normalise in f32, cast back, then multiply by the weight (spec §2.1).
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    weight_f32: Vec<f32>, // for the tensor-free decode step
    eps: f64,
}

impl RmsNorm {
    fn load(s: &Scope, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        let weight = s.get("weight", &[dim], dtype)?;
        let weight_f32 = weight.to_dtype(DType::F32)?.to_vec1()?;
        Ok(RmsNorm { weight, weight_f32, eps })
    }

    /// `[n, dim]` → `[n, dim]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?);
        }
        if x.device().is_cpu() && x.dtype() == DType::BF16 {
            return Ok(x.contiguous()?.apply_op1_no_bwd(&step::Bf16Norm(self))?);
        }
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(xn.to_dtype(x.dtype())?.broadcast_mul(&self.weight)?)
    }
}

/// Fused-qkv grouped-query attention.
#[derive(Debug, Clone)]
struct Attention {
    qkv_proj: LoraLinear,
    o_proj: LoraLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(s: &Scope, cfg: &ModelConfig, dtype: DType, quant: Option<QType>) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let hidden = cfg.hidden_size;
        let loras = lora_set(cfg);
        Ok(Attention {
            qkv_proj: LoraLinear::load(&s.pp("qkv_proj"), hidden, (h + 2 * kv) * d, loras, dtype, quant)?,
            o_proj: LoraLinear::load(&s.pp("o_proj"), h * d, hidden, loras, dtype, quant)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x` `[n, hidden]` at positions `start..start+n` → `[n, hidden]`.
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        start: usize,
        cos_sin: &(Tensor, Tensor),
        rope: &Rope,
        cache: &mut KvCache,
        adapter: Option<Adapter>,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward(x, adapter)?; // [n, (h + 2kv)·d]
        let split = |off: usize, heads: usize| -> Result<Tensor> {
            // [n, heads·d] → [heads, n, d]
            Ok(qkv.narrow(1, off, heads * d)?.reshape((n, heads, d))?.transpose(0, 1)?)
        };
        let q = split(0, h)?;
        let k = split(h * d, kv)?;
        let v = split((h + kv) * d, kv)?;
        let (cos, sin) = cos_sin;
        let q = rope::apply(&q, cos, sin, rope.rotary_dims())?; // [h, n, d]
        let k = rope::apply(&k, cos, sin, rope.rotary_dims())?; // [kv, n, d]
        let scale = 1.0 / (d as f64).sqrt();
        if n == 1 && cache.can_attend() {
            // Decode reads the cache in place (no widened copy of every key and value).
            cache.write(layer, start, &k, &v)?;
            let qf: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?; // [h·d]
            let out = cache.attend(layer, &qf, h, start + 1, scale as f32)?;
            let out = Tensor::from_vec(out, (1, h * d), x.device())?.to_dtype(x.dtype())?;
            return self.o_proj.forward(&out, adapter);
        }
        let (keys, values) = cache.append(layer, start, &k, &v)?; // [kv, L, d]
        if causal_kernel(x.device()) {
            let out = crate::kernels::attention::causal(&q, &keys, &values, start, scale as f32)?.to_dtype(x.dtype())?;
            return self.o_proj.forward(&out, adapter);
        }
        let total = start + n;
        let group = h / kv;

        // Query head g·kv… grouped under its KV head: [kv, group·n, d].
        // Attention in f32 (the cache stays in the activation dtype): the score matrices are
        // the large tensors, and the CPU backend has no bf16 GEMM.
        let q = q.contiguous()?.reshape((kv, group * n, d))?.to_dtype(DType::F32)?;
        let keys = keys.to_dtype(DType::F32)?;
        let scores = (q.matmul(&keys.t()?)? * scale)?; // [kv, group·n, L]
        let scores = if n > 1 {
            let mask = causal_mask(start, n, x.device())?;
            scores
                .reshape((kv, group, n, total))?
                .broadcast_add(&mask)?
                .reshape((kv, group * n, total))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?; // [kv, group·n, d]
        let out = out.reshape((h, n, d))?.transpose(0, 1)?.reshape((n, h * d))?;
        self.o_proj.forward(&out, adapter)
    }
}

/// Whether prefill attention on `device` runs on the fused causal kernel (it computes in f32,
/// as the portable matmul path does, whose score matrix bounds the chunk size).
fn causal_kernel(device: &Device) -> bool {
    crate::kernels::attention::takes(device, DType::F32)
}

/// `[n, L]` additive mask: query `i` (position `start+i`) sees keys `0..=start+i`.
fn causal_mask(start: usize, n: usize, device: &Device) -> Result<Tensor> {
    let total = start + n;
    let mut m = vec![0f32; n * total];
    for i in 0..n {
        for j in (start + i + 1)..total {
            m[i * total + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (n, total), device)?)
}

/// `gate_up_proj` (gate first, then up) → SiLU(gate)·up → `down_proj`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up_proj: LoraLinear,
    down_proj: LoraLinear,
    inter: usize,
}

impl Mlp {
    fn load(s: &Scope, cfg: &ModelConfig, dtype: DType, quant: Option<QType>) -> Result<Self> {
        let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let loras = lora_set(cfg);
        Ok(Mlp {
            gate_up_proj: LoraLinear::load(&s.pp("gate_up_proj"), hid, 2 * inter, loras, dtype, quant)?,
            down_proj: LoraLinear::load(&s.pp("down_proj"), inter, hid, loras, dtype, quant)?,
            inter,
        })
    }

    /// `[n, hidden]` → SiLU(gate)·up `[n, inter]`.
    fn up(&self, x: &Tensor, adapter: Option<Adapter>) -> Result<Tensor> {
        let gu = self.gate_up_proj.forward(x, adapter)?; // [n, 2·inter]
        debug_assert_eq!(gu.dim(1)?, 2 * self.inter);
        crate::kernels::elementwise::swiglu(&gu)
    }

    /// `[n, inter]` → `[n, hidden]`.
    fn down(&self, h: &Tensor, adapter: Option<Adapter>) -> Result<Tensor> {
        self.down_proj.forward(h, adapter)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    /// The four projections (qkv, o, gate_up, down).
    fn projections(&self) -> [&LoraLinear; 4] {
        [&self.self_attn.qkv_proj, &self.self_attn.o_proj, &self.mlp.gate_up_proj, &self.mlp.down_proj]
    }

    /// [`Layer::projections`], mutable.
    fn projections_mut(&mut self) -> [&mut LoraLinear; 4] {
        [&mut self.self_attn.qkv_proj, &mut self.self_attn.o_proj, &mut self.mlp.gate_up_proj, &mut self.mlp.down_proj]
    }
}

fn lora_set(cfg: &ModelConfig) -> [(Adapter, Option<&crate::model::config::LoraConfig>); 2] {
    [
        (Adapter::Vision, cfg.vision_lora.as_ref()),
        (Adapter::Speech, cfg.speech_lora.as_ref()),
    ]
}

/// The whole decoder.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: Matrix, // [vocab, hidden]
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Option<Matrix>, // None: tied to embed_tokens
    rope: Rope,
    kv_heads: usize,
    head_dim: usize,
    heads: usize,
    hidden: usize,
    vocab: usize,
    dtype: DType,
    device: Device,
    /// Upper bound on the bytes of one attention score matrix during prefill.
    max_score_bytes: usize,
    kv_format: KvFormat,
    /// Whether single tokens take the tensor-free path (`step`): CPU, f32/bf16 activations,
    /// every weight with a mat-vec kernel.
    steppable: bool,
}

impl Decoder {
    /// Loads `model.*` from the checkpoint in `dtype`, the projections quantised to `quant`
    /// (the tied embedding / LM head to [`QType::head_format`]).
    pub fn load(cfg: &ModelConfig, w: &Weights, dtype: DType, device: &Device, quant: Option<QType>) -> Result<Self> {
        let m = w.root().pp("model");
        let (hid, vocab, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps);
        let head_quant = quant.map(QType::head_format);
        let embed_tokens = m.pp("embed_tokens").matrix("weight", vocab, hid, dtype, head_quant)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            layers.push(Layer {
                input_layernorm: RmsNorm::load(&l.pp("input_layernorm"), hid, eps, dtype)?,
                self_attn: Attention::load(&l.pp("self_attn"), cfg, dtype, quant)?,
                post_attention_layernorm: RmsNorm::load(
                    &l.pp("post_attention_layernorm"),
                    hid,
                    eps,
                    dtype,
                )?,
                mlp: Mlp::load(&l.pp("mlp"), cfg, dtype, quant)?,
            });
        }
        let norm = RmsNorm::load(&m.pp("norm"), hid, eps, dtype)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.root().pp("lm_head").matrix("weight", vocab, hid, dtype, head_quant)?)
        };
        let steppable = device.is_cpu()
            && matches!(dtype, DType::F32 | DType::BF16)
            && layers.iter().all(|l| l.projections().iter().all(|p| p.has_matvec()));
        Ok(Decoder {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg),
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim(),
            heads: cfg.num_attention_heads,
            hidden: hid,
            vocab,
            dtype,
            device: device.clone(),
            max_score_bytes: 256 << 20,
            kv_format: KvFormat::Dense,
            steppable,
        })
    }

    /// The rotary tables (for the engine's long/short decisions).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Vocabulary size of the LM head.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Hidden width.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weight format of the projections (`bf16`, `q4_0`, …).
    pub fn format(&self) -> String {
        match self.layers.first().map(|l| l.mlp.down_proj.format()) {
            Some(f) => f,
            None => format!("{:?}", self.dtype).to_lowercase(),
        }
    }

    /// Bytes of the decoder's weights: (projections + embedding/head + norms, LoRA adapters).
    pub fn nbytes(&self) -> (usize, usize) {
        let mut base = self.embed_tokens.nbytes() + self.lm_head.as_ref().map_or(0, Matrix::nbytes);
        let mut lora = 0;
        for l in &self.layers {
            for p in l.projections() {
                let (b, a) = p.nbytes();
                base += b;
                lora += a;
            }
        }
        (base, lora)
    }

    /// Whether every layer carries `adapter`.
    pub fn has_adapter(&self, adapter: Adapter) -> bool {
        self.layers.iter().all(|l| l.projections().iter().all(|p| p.has(adapter)))
    }

    /// Token embeddings `[n, hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab) {
            return Err(Error::Request(format!(
                "token id {bad} is outside the vocabulary ({} entries)",
                self.vocab
            )));
        }
        match &self.embed_tokens {
            Matrix::Dense(t) => {
                let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
                Ok(t.index_select(&ids, 0)?)
            }
            Matrix::Quant(q) => {
                let h = self.hidden;
                let mut out = vec![0f32; ids.len() * h];
                for (&id, row) in ids.iter().zip(out.chunks_mut(h)) {
                    q.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), h), &self.device)?.to_dtype(self.dtype)?)
            }
        }
    }

    /// Chooses the format of the caches [`Decoder::new_cache`] makes.
    pub fn set_kv_format(&mut self, format: KvFormat) -> Result<()> {
        if format == KvFormat::Q8 && !self.device.is_cpu() {
            return Err(Error::Request("the 8-bit KV cache runs on the CPU only".into()));
        }
        self.kv_format = format;
        Ok(())
    }

    /// Bytes one position of a sequence takes in the KV cache (every layer, keys and values).
    pub fn kv_bytes_per_position(&self) -> usize {
        let per_vector = match self.kv_format {
            KvFormat::Q8 => self.head_dim + 4,
            KvFormat::Dense => self.head_dim * self.dtype.size_in_bytes(),
        };
        2 * self.layers.len() * self.kv_heads * per_vector
    }

    /// An empty KV cache with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::with_format(
            self.layers.len(),
            self.kv_heads,
            self.head_dim,
            capacity,
            self.dtype,
            self.kv_format,
            &self.device,
        )
    }

    /// Runs `embeds` `[n, hidden]` at the positions following the cache and returns the final
    /// normalised hidden state of the last position `[1, hidden]`. A call starting at position 0
    /// picks the LongRoPE mode from the total length; later calls must stay in that mode (the
    /// engine re-prefills when the sequence crosses into long mode, as the reference does).
    /// With `taps`, records `embeddings`, `layer.{i}` (output of block i, all positions) and
    /// `final_norm`, and runs the prompt in one piece.
    pub fn forward(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        adapter: Option<Adapter>,
        taps: Option<&mut Taps>,
    ) -> Result<Tensor> {
        let long = self.rope.is_long(cache.len() + embeds.dim(0)?);
        self.forward_as(embeds, cache, adapter, long, taps)
    }

    /// [`Decoder::forward`] in the given LongRoPE mode: a piece of a prompt prefilled in
    /// chunks takes the mode of the whole prompt (the reference decides it from the length of
    /// the sequence it prefills).
    pub fn forward_as(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        adapter: Option<Adapter>,
        long: bool,
        taps: Option<&mut Taps>,
    ) -> Result<Tensor> {
        // Checks the adapter and the mode, and resets a cache that starts here.
        let mut job = self.prefill(embeds, cache, adapter, long)?;
        if let Some(t) = taps {
            return self.run_tapped(embeds, cache, adapter, long, t);
        }
        loop {
            if let Some(h) = self.advance(&mut job, cache)? {
                return Ok(h);
            }
        }
    }

    /// The whole input in one pass, recording the embeddings, every block's output and the
    /// final norm; returns the last row's final normalised hidden state.
    fn run_tapped(&self, embeds: &Tensor, cache: &mut KvCache, adapter: Option<Adapter>, long: bool, taps: &mut Taps) -> Result<Tensor> {
        let pos = cache.len();
        let mut x = embeds.to_dtype(self.dtype)?;
        let cos_sin = self.rope.cos_sin(pos, x.dim(0)?, long, self.dtype, &self.device)?;
        taps.push(("embeddings".into(), x.clone()));
        for i in 0..self.layers.len() {
            let mut st = (x, None);
            for piece in 0..PIECES_PER_BLOCK {
                st = self.block_piece(i, piece, st, pos, &cos_sin, cache, adapter)?;
            }
            x = st.0;
            taps.push((format!("layer.{i}"), x.clone()));
        }
        cache.set_len(pos + x.dim(0)?);
        taps.push(("final_norm".into(), self.norm.forward(&x)?));
        self.norm.forward(&x.narrow(0, x.dim(0)? - 1, 1)?)
    }

    /// Queries per prefill chunk: 2048 on the fused kernel (no score matrix), else so one score
    /// matrix stays under `max_score_bytes`.
    fn prefill_chunk(&self, total: usize) -> usize {
        if causal_kernel(&self.device) {
            return 2048;
        }
        let per_query = self.heads * total * 4;
        (self.max_score_bytes / per_query.max(1)).clamp(16, 2048)
    }

    /// Logits `[vocab]` (f32) of a final hidden state `[1, hidden]`.
    pub fn logits(&self, h: &Tensor) -> Result<Vec<f32>> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        if self.steppable && head.has_matvec() && h.elem_count() == self.hidden {
            let x: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut l = vec![0f32; self.vocab];
            crate::kernels::team::with_team(|| head.matvec(&x, &mut l, &mut crate::kernels::VecScratch::default()))?;
            if self.dtype == DType::BF16 {
                l.iter_mut().for_each(|v| *v = <crate::model::quant::Bf16Act as crate::model::quant::Act>::round(*v));
            }
            return Ok(l);
        }
        let l = head.forward(h)?; // [1, vocab]
        Ok(l.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

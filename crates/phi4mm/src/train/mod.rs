//! Fine-tuning a LoRA adapter of the decoder (the official recipes, spec of issue 18): the
//! prompt goes through the chat template with its media encoded by the engine (frozen), the
//! target is `answer<|end|><|endoftext|>`, and the loss is the mean −log p over the target
//! tokens of the whole global batch — only the target tokens: the official scripts pad the
//! labels with 0 and so also train on padding, which this does not copy. Updates are AdamW with
//! global grad-norm clipping under a linear warmup-then-decay schedule ([`adamw`]).
//!
//! Trainable are the mode's LoRA pairs, continued from the checkpoint's adapter or started
//! fresh (A uniform in ±1/√in, B zero, as PEFT initialises them). Their gradients come from
//! [`forward`]'s differentiable decoder; the frozen weights get none.

pub mod adamw;
pub mod adapter;
mod forward;

use candle_core::{DType, Tensor, Var};

use crate::decoder::lora::Adapter;
use crate::decoder::{DecoderTensors, PROJ_NAMES};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::{Example, Task};
use crate::{GenerateRequest, MediaInput, Message, PromptInput};
pub use adamw::{AdamW, AdamWConfig};
use forward::{target_nll, Lora};

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The adapter trained (the mode of every example must use it).
    pub adapter: Adapter,
    pub optim: AdamWConfig,
    /// Updates of linear warmup before the linear decay.
    pub warmup_steps: usize,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Start a new adapter of this rank and alpha instead of continuing the checkpoint's.
    pub fresh: Option<(usize, f64)>,
    /// Seed of a fresh adapter's initialisation.
    pub seed: u64,
}

impl TrainOptions {
    /// The official recipe's settings for `adapter`: AdamW lr 4e-5, β (0.9, 0.95), eps 1e-7,
    /// weight decay 0.01, 50 warmup updates, clip 1.0, the checkpoint's adapter.
    pub fn recipe(adapter: Adapter) -> Self {
        TrainOptions { adapter, optim: AdamWConfig::default(), warmup_steps: 50, max_grad_norm: 1.0, fresh: None, seed: 0 }
    }
}

/// One example ready for the decoder: its input rows and the ids the last rows must predict.
#[derive(Debug, Clone)]
pub struct TrainItem {
    /// `[prompt + target − 1, hidden]`: the prompt with media merged, then the target but its
    /// last token.
    pub embeds: Tensor,
    /// The target's ids (`answer<|end|><|endoftext|>`).
    pub targets: Vec<u32>,
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean −log p per target token over the batch (before the update).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the update used.
    pub lr: f64,
    /// Target tokens in the batch.
    pub tokens: usize,
}

/// A fine-tuning run over one loaded model.
pub struct Trainer<'e> {
    engine: &'e Engine,
    w: DecoderTensors,
    loras: Vec<[Option<Lora>; 4]>,
    opts: TrainOptions,
    opt: AdamW,
    rank: usize,
    alpha: f64,
}

impl<'e> Trainer<'e> {
    /// Takes the decoder's weights and the adapter to train (the checkpoint's, or a fresh one).
    pub fn new(engine: &'e Engine, opts: TrainOptions) -> Result<Self> {
        let w = engine.decoder().tensors(opts.adapter)?;
        let name = opts.adapter.name();
        let (rank, alpha, loras) = match opts.fresh {
            Some((r, alpha)) => (r, alpha, fresh_loras(&w, r, alpha, opts.seed)?),
            None => checkpoint_loras(engine, &w, name)?,
        };
        let sizes: Vec<usize> = loras.iter().flatten().flatten().flat_map(|l| [l.a.elem_count(), l.b.elem_count()]).collect();
        Ok(Trainer { engine, w, loras, opts, opt: AdamW::new(&sizes), rank, alpha })
    }

    /// Rank and alpha of the trained adapter.
    pub fn rank_alpha(&self) -> (usize, f64) {
        (self.rank, self.alpha)
    }

    /// Updates done.
    pub fn updates(&self) -> usize {
        self.opt.t
    }

    /// Prepares `ex` for `task`: prompt through the chat template, media encoded, target
    /// tokenised. Errors name the line when its media does not select the trained adapter.
    pub fn item(&self, ex: &Example, task: &Task) -> Result<TrainItem> {
        let mut req = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", ex.user_prompt(task)?)]));
        req.audios = ex.audios.iter().cloned().map(MediaInput::Path).collect();
        req.images = ex.images.iter().cloned().map(MediaInput::Path).collect();
        let prepared = self.engine.prepare(&req).map_err(|e| Error::Request(format!("line {}: {e}", ex.line)))?;
        if prepared.mode.adapter() != Some(self.opts.adapter) {
            let need = match self.opts.adapter {
                Adapter::Speech => "audio and no image",
                Adapter::Vision => "an image",
            };
            return Err(Error::Request(format!("line {}: a {} fine-tune needs {need} in every example", ex.line, self.opts.adapter.name())));
        }
        let prompt = self.engine.embed_prompt(&prepared)?;
        self.item_from(&prompt, &ex.target)
    }

    /// A [`TrainItem`] from prompt rows `[p, hidden]` and the answer text.
    pub fn item_from(&self, prompt: &Tensor, answer: &str) -> Result<TrainItem> {
        let targets = self.engine.tokenizer().encode(&format!("{answer}<|end|><|endoftext|>"))?;
        let head = Tensor::from_vec(targets[..targets.len() - 1].to_vec(), targets.len() - 1, &self.w.device)?;
        let rows = self.w.embed.index_select(&head, 0)?.to_dtype(prompt.dtype())?;
        Ok(TrainItem { embeds: Tensor::cat(&[prompt, &rows], 0)?.detach(), targets })
    }

    /// The batch's mean loss per target token and every trained parameter's gradient of it (in
    /// [`Trainer::parameters`] order), one example at a time.
    pub fn loss_and_grads(&self, items: &[TrainItem]) -> Result<(f64, Vec<Vec<f32>>, usize)> {
        let tokens: usize = items.iter().map(|i| i.targets.len()).sum();
        if tokens == 0 {
            return Err(Error::Request("the batch has no target tokens".into()));
        }
        let vars: Vec<&Var> = self.loras.iter().flatten().flatten().flat_map(|l| [&l.a, &l.b]).collect();
        let mut acc: Vec<Vec<f32>> = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
        let mut loss = 0.0;
        for item in items {
            let nll = (target_nll(&self.w, &self.loras, &item.embeds, &item.targets)? / tokens as f64)?;
            loss += nll.to_scalar::<f32>()? as f64;
            let grads = nll.backward()?;
            for (a, v) in acc.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    a.iter_mut().zip(g).for_each(|(x, y)| *x += y);
                }
            }
        }
        Ok((loss, acc, tokens))
    }

    /// One update on a global batch: gradients, clipping, AdamW at the scheduled rate
    /// (`total_updates` of the run sets the decay).
    pub fn step(&mut self, items: &[TrainItem], total_updates: usize) -> Result<StepStats> {
        let (loss, mut grads, tokens) = self.loss_and_grads(items)?;
        let grad_norm = adamw::clip_grad_norm(&mut grads, self.opts.max_grad_norm);
        let lr = adamw::linear_schedule(self.opts.optim.lr, self.opt.t, self.opts.warmup_steps, total_updates);
        let vars: Vec<&Var> = self.loras.iter().flatten().flatten().flat_map(|l| [&l.a, &l.b]).collect();
        let mut params = vars.iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect::<Result<Vec<_>>>()?;
        self.opt.step(&self.opts.optim, lr, &mut params, &grads)?;
        for (v, p) in vars.iter().zip(params) {
            v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
        }
        Ok(StepStats { loss, grad_norm, lr, tokens })
    }

    /// The trained tensors with their checkpoint names
    /// (`model.layers.{i}.{proj}.lora_{A,B}.{adapter}.weight`), A before B, layer by layer.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let name = self.opts.adapter.name();
        let mut out = Vec::new();
        for (i, layer) in self.loras.iter().enumerate() {
            for (j, l) in layer.iter().enumerate() {
                let Some(l) = l else { continue };
                let base = format!("model.layers.{i}.{}", PROJ_NAMES[j]);
                out.push((format!("{base}.lora_A.{name}.weight"), l.a.as_tensor().clone()));
                out.push((format!("{base}.lora_B.{name}.weight"), l.b.as_tensor().clone()));
            }
        }
        out
    }

    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// The optimizer's state (for saving and resuming).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Replaces the optimizer state and the trained values (a resumed run), by parameter order.
    pub fn restore(&mut self, params: Vec<Vec<f32>>, opt: AdamW) -> Result<()> {
        let vars: Vec<&Var> = self.loras.iter().flatten().flatten().flat_map(|l| [&l.a, &l.b]).collect();
        if params.len() != vars.len() || opt.m.len() != vars.len() || params.iter().zip(&vars).any(|(p, v)| p.len() != v.elem_count()) {
            return Err(Error::Request("the saved state does not match this adapter's shapes".into()));
        }
        for (v, p) in vars.iter().zip(params) {
            v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
        }
        self.opt = opt;
        Ok(())
    }
}

/// The checkpoint's pairs of `name` as f32 variables.
fn checkpoint_loras(engine: &Engine, w: &DecoderTensors, name: &str) -> Result<(usize, f64, Vec<[Option<Lora>; 4]>)> {
    let cfg = match name {
        "speech" => engine.config().speech_lora.as_ref(),
        _ => engine.config().vision_lora.as_ref(),
    };
    let cfg = cfg.ok_or_else(|| Error::Request(format!("the checkpoint has no {name} adapter to continue; start a fresh one (--rank)")))?;
    let mut out = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let pair = |j: usize| -> Result<Option<Lora>> {
            let Some((a, b, scale)) = &l.proj[j].lora else { return Ok(None) };
            Ok(Some(Lora { a: Var::from_tensor(&a.to_dtype(DType::F32)?)?, b: Var::from_tensor(&b.to_dtype(DType::F32)?)?, scale: *scale }))
        };
        out.push([pair(0)?, pair(1)?, pair(2)?, pair(3)?]);
    }
    Ok((cfg.r, cfg.lora_alpha, out))
}

/// New pairs on every projection: A uniform in ±1/√in (PEFT's `kaiming_uniform_(a=√5)`), B zero.
fn fresh_loras(w: &DecoderTensors, r: usize, alpha: f64, seed: u64) -> Result<Vec<[Option<Lora>; 4]>> {
    if r == 0 {
        return Err(Error::Request("the LoRA rank must be at least 1".into()));
    }
    let mut rng = SplitMix(seed ^ 0x5EED_1A0A);
    let mut out = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let mut pair = |j: usize| -> Result<Option<Lora>> {
            let (rows, cols) = l.proj[j].base.dims2()?;
            let bound = 1.0 / (cols as f64).sqrt();
            let a: Vec<f32> = (0..r * cols).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, cols), &w.device)?)?;
            let b = Var::from_tensor(&Tensor::zeros((rows, r), DType::F32, &w.device)?)?;
            Ok(Some(Lora { a, b, scale: alpha / r as f64 }))
        };
        out.push([pair(0)?, pair(1)?, pair(2)?, pair(3)?]);
    }
    Ok(out)
}

/// A small seeded generator for the initialisation (splitmix64).
struct SplitMix(u64);

impl SplitMix {
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

//! Fine-tuning a LoRA adapter of the decoder (the official fine-tuning recipes): the
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
mod forward;

use candle_core::{DType, Tensor, Var};

use crate::decoder::lora::Adapter;
use crate::decoder::{DecoderTensors, PROJ_NAMES};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::eval::{Example, Task};
use crate::GenerateRequest;
pub use adamw::{AdamW, AdamWConfig};
use forward::{nll_backward, target_nll, Lora};

/// The optimizer state's file in a saved step's folder.
pub const STATE_FILE: &str = "optimizer.safetensors";

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
        Self::with_tensors(engine, engine.decoder().tensors(opts.adapter)?, opts)
    }

    /// [`Trainer::new`] from tensors taken before the engine dropped its own copy of the
    /// adapter ([`Engine::drop_adapter`]): the trainer keeps only its f32 variables of it.
    pub fn with_tensors(engine: &'e Engine, mut w: DecoderTensors, opts: TrainOptions) -> Result<Self> {
        let name = opts.adapter.name();
        let (rank, alpha, loras) = match opts.fresh {
            Some((r, alpha)) => (r, alpha, fresh_loras(&w, r, alpha, opts.seed)?),
            None => checkpoint_loras(&w, name)?,
        };
        w.layers.iter_mut().flat_map(|l| l.proj.iter_mut()).for_each(|p| p.lora = None);
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
        let req = ex.request(task, GenerateRequest::new)?;
        check_media(self.opts.adapter, std::slice::from_ref(ex))?;
        let prepared = self.engine.prepare(&req).map_err(|e| Error::Request(format!("line {}: {e}", ex.line)))?;
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
        let (loss, grads, tokens) = self.grad_tensors(items)?;
        let grads = grads.iter().map(|g| Ok(g.flatten_all()?.to_vec1::<f32>()?)).collect::<Result<Vec<_>>>()?;
        Ok((loss, grads, tokens))
    }

    /// [`Trainer::loss_and_grads`] with the gradients as f32 tensors (the first example's
    /// gradients are the accumulator: no second set of buffers for a batch of one).
    fn grad_tensors(&self, items: &[TrainItem]) -> Result<(f64, Vec<Tensor>, usize)> {
        let tokens: usize = items.iter().map(|i| i.targets.len()).sum();
        if tokens == 0 {
            return Err(Error::Request("the batch has no target tokens".into()));
        }
        let vars = self.vars();
        let index: std::collections::HashMap<_, usize> = vars.iter().enumerate().map(|(i, v)| (v.id(), i)).collect();
        let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss = 0.0;
        for item in items {
            let mut sink = |v: &Var, g: Tensor| -> Result<()> {
                let slot = &mut acc[index[&v.id()]];
                let g = g.to_dtype(DType::F32)?;
                *slot = Some(match slot.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
                Ok(())
            };
            loss += nll_backward(&self.w, &self.loras, &item.embeds, &item.targets, 1.0 / tokens as f64, &mut sink)?;
        }
        let grads = acc.into_iter().zip(&vars).map(|(g, v)| g.map_or_else(|| Ok(v.as_tensor().zeros_like()?), Ok)).collect::<Result<Vec<_>>>()?;
        Ok((loss, grads, tokens))
    }

    fn vars(&self) -> Vec<&Var> {
        self.loras.iter().flatten().flatten().flat_map(|l| [&l.a, &l.b]).collect()
    }

    /// One update on a global batch: gradients, clipping, AdamW at the scheduled rate
    /// (`total_updates` of the run sets the decay), one tensor at a time.
    pub fn step(&mut self, items: &[TrainItem], total_updates: usize) -> Result<StepStats> {
        let (loss, grads, tokens) = self.grad_tensors(items)?;
        let sq: f64 = grads.iter().map(|g| Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?)).sum::<Result<f64>>()?;
        let (grad_norm, coef) = adamw::clip_coef(sq.sqrt(), self.opts.max_grad_norm);
        let lr = adamw::linear_schedule(self.opts.optim.lr, self.opt.t, self.opts.warmup_steps, total_updates);
        self.opt.t += 1;
        let vars: Vec<Var> = self.vars().into_iter().cloned().collect();
        for (i, (v, g)) in vars.iter().zip(grads).enumerate() {
            let mut p = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let mut g = g.flatten_all()?.to_vec1::<f32>()?;
            g.iter_mut().for_each(|x| *x *= coef);
            self.opt.update(i, &self.opts.optim, lr, &mut p, &g)?;
            v.set(&Tensor::from_vec(p, v.shape(), v.device())?)?;
        }
        Ok(StepStats { loss, grad_norm, lr, tokens })
    }

    /// The batch's mean loss per target token, forward only (evaluation).
    pub fn loss(&self, items: &[TrainItem]) -> Result<f64> {
        let tokens: usize = items.iter().map(|i| i.targets.len()).sum();
        let mut sum = 0.0;
        for item in items {
            sum += target_nll(&self.w, &self.loras, &item.embeds, &item.targets)?;
        }
        Ok(sum / tokens.max(1) as f64)
    }

    /// Writes the optimizer state (`optimizer.safetensors`: both moments of every trained
    /// tensor, and the update count) into `dir`, beside an adapter saved there.
    pub fn save_state(&self, dir: &std::path::Path) -> Result<()> {
        let mut map = std::collections::HashMap::new();
        for ((name, t), (m, v)) in self.parameters().iter().zip(self.opt.m.iter().zip(&self.opt.v)) {
            map.insert(format!("exp_avg.{name}"), Tensor::from_slice(m, t.shape(), &candle_core::Device::Cpu)?);
            map.insert(format!("exp_avg_sq.{name}"), Tensor::from_slice(v, t.shape(), &candle_core::Device::Cpu)?);
        }
        map.insert("step".into(), Tensor::new(&[self.opt.t as u32], &candle_core::Device::Cpu)?);
        Ok(candle_core::safetensors::save(&map, dir.join(STATE_FILE))?)
    }

    /// Continues from `dir` (an adapter and optimizer state saved by a run with the same
    /// adapter shapes): the trained values, both moments and the update count.
    pub fn resume(&mut self, dir: &std::path::Path) -> Result<()> {
        let name = self.opts.adapter.name();
        let (_, tensors) = crate::model::adapter::load(dir, name)?;
        let saved: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let path = dir.join(STATE_FILE);
        let state = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map_err(|e| Error::Request(format!("cannot read {}: {e}", path.display())))?;
        let vec = |map: &std::collections::HashMap<String, Tensor>, k: &str| -> Result<Vec<f32>> {
            let t = map.get(k).ok_or_else(|| Error::Request(format!("{} has no `{k}`", dir.display())))?;
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let names: Vec<String> = self.parameters().into_iter().map(|(n, _)| n).collect();
        let mut opt = AdamW::default();
        let mut params = Vec::with_capacity(names.len());
        for n in &names {
            params.push(vec(&saved, n)?);
            opt.m.push(vec(&state, &format!("exp_avg.{n}"))?);
            opt.v.push(vec(&state, &format!("exp_avg_sq.{n}"))?);
        }
        opt.t = state.get("step").map(|t| t.to_vec1::<u32>()).transpose()?.and_then(|v| v.first().copied()).unwrap_or(0) as usize;
        self.restore(params, opt)
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
        let vars = self.vars();
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

/// Errors on the first example whose media does not select `adapter` (speech: audio and no
/// image; vision: an image), naming its line.
pub fn check_media(adapter: Adapter, examples: &[Example]) -> Result<()> {
    for ex in examples {
        let mode = crate::Mode::from_media(ex.images.len(), ex.audios.len());
        if mode.adapter() != Some(adapter) {
            let need = match adapter {
                Adapter::Speech => "audio and no image",
                Adapter::Vision => "an image",
            };
            return Err(Error::Request(format!("line {}: a {} fine-tune needs {need} in every example", ex.line, adapter.name())));
        }
    }
    Ok(())
}

/// The loaded pairs of `name` (the checkpoint's, or an adapter loaded over them) as f32
/// variables, with their rank and alpha.
fn checkpoint_loras(w: &DecoderTensors, name: &str) -> Result<(usize, f64, Vec<[Option<Lora>; 4]>)> {
    let first = w.layers.iter().flat_map(|l| l.proj.iter()).find_map(|p| p.lora.as_ref());
    let Some((a, _, scale)) = first else {
        return Err(Error::Request(format!("the checkpoint has no {name} adapter to continue; start a fresh one (--rank)")));
    };
    let rank = a.dim(0)?;
    let mut out = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let pair = |j: usize| -> Result<Option<Lora>> {
            let Some((a, b, scale)) = &l.proj[j].lora else { return Ok(None) };
            Ok(Some(Lora { a: Var::from_tensor(&a.to_dtype(DType::F32)?)?, b: Var::from_tensor(&b.to_dtype(DType::F32)?)?, scale: *scale }))
        };
        out.push([pair(0)?, pair(1)?, pair(2)?, pair(3)?]);
    }
    Ok((rank, scale * rank as f64, out))
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

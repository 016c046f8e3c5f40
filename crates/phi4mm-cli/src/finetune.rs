//! `phi4mm finetune`: train the speech or vision LoRA adapter on a JSON-lines set (the format
//! of `phi4mm eval`), with the official recipe's optimizer and schedule, and save it in PEFT's
//! layout for `--adapter MODE=DIR`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use phi4mm::decoder::lora::Adapter;
use phi4mm::eval::{self, Example, Task};
use phi4mm::model::adapter::{self, AdapterInfo};
use phi4mm::train::{AdamWConfig, TrainOptions, Trainer};

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Which adapter: speech (examples with audio) or vision (examples with an image).
    #[arg(long)]
    pub mode: String,
    /// Training set: JSON lines of {"audio"|"image": path(s), "instruction"?, "target"}.
    #[arg(long)]
    pub train: PathBuf,
    /// Held-out set: its mean loss per target token is reported at every --eval-every.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Where the adapter goes (adapter_config.json, adapter_model.safetensors, optimizer state).
    #[arg(long)]
    pub out: PathBuf,
    /// Default prompt of lines without an instruction: asr (speech's default), ast, vqa.
    #[arg(long)]
    pub task: Option<String>,
    /// For --task ast: the target language of lines without an instruction.
    #[arg(long)]
    pub translate_to: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Examples per update (the global batch; gradients are accumulated one example at a time).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 4e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 50)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Start a fresh adapter of this rank instead of continuing the checkpoint's.
    #[arg(long)]
    pub rank: Option<usize>,
    /// Alpha of a fresh adapter (default: twice the rank, as both official adapters).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Seed of the example order and of a fresh adapter's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Report the held-out loss every N updates (0: at the end of each epoch).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Also save a resumable step (`DIR/checkpoint-N`) every N updates (0: only the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from a folder saved by --save-every (or the final --out).
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let adapter = match a.mode.as_str() {
        "speech" => Adapter::Speech,
        "vision" => Adapter::Vision,
        other => bail!("unknown --mode `{other}` (speech or vision)"),
    };
    let default_task = if adapter == Adapter::Speech { "asr" } else { "vqa" };
    let task = Task::parse(a.task.as_deref().unwrap_or(default_task), a.translate_to.as_deref())?;
    if a.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    let train = eval::read_examples(&a.train)?;
    let held = a.eval.as_deref().map(eval::read_examples).transpose()?;
    phi4mm::train::check_media(adapter, &train).with_context(|| a.train.display().to_string())?;
    if let (Some(h), Some(path)) = (&held, &a.eval) {
        phi4mm::train::check_media(adapter, h).with_context(|| path.display().to_string())?;
    }
    let (mut engine, _) = a.model.load()?;
    let tensors = engine.decoder().tensors(adapter)?;
    free_unused(&mut engine, adapter, &train, held.as_deref());
    let opts = TrainOptions {
        adapter,
        optim: AdamWConfig { lr: a.lr, weight_decay: a.weight_decay, ..AdamWConfig::default() },
        warmup_steps: a.warmup_steps,
        max_grad_norm: a.max_grad_norm,
        fresh: a.rank.map(|r| (r, a.alpha.unwrap_or(2.0 * r as f64))),
        seed: a.seed,
    };
    let mut trainer = Trainer::with_tensors(&engine, tensors, opts)?;
    if let Some(dir) = &a.resume {
        trainer.resume(dir).with_context(|| format!("resuming from {}", dir.display()))?;
    }
    let per_epoch = train.len().div_ceil(a.batch_size);
    let run = Run { a: &a, task: &task, train: &train, held: held.as_deref(), total: per_epoch * a.epochs, per_epoch };
    run.train(&mut trainer)?;
    save(&trainer, &a.out, &a.model.model)?;
    eprintln!("saved the {} adapter to {}", adapter.name(), a.out.display());
    Ok(())
}

/// Frees what the run does not use: both adapters in the engine (the trainer holds its own
/// f32 copy of the trained one), and the encoder no example needs.
fn free_unused(engine: &mut phi4mm::Engine, adapter: Adapter, train: &[Example], held: Option<&[Example]>) {
    engine.drop_adapter(Adapter::Speech);
    engine.drop_adapter(Adapter::Vision);
    let all = || train.iter().chain(held.unwrap_or(&[]));
    if adapter == Adapter::Speech || all().all(|e| e.images.is_empty()) {
        engine.drop_vision_encoder();
    }
    if all().all(|e| e.audios.is_empty()) {
        engine.drop_audio_encoder();
    }
}

/// One training run's fixed inputs.
struct Run<'a> {
    a: &'a FinetuneArgs,
    task: &'a Task,
    train: &'a [Example],
    held: Option<&'a [Example]>,
    total: usize,
    per_epoch: usize,
}

impl Run<'_> {
    fn train(&self, trainer: &mut Trainer) -> Result<()> {
        std::fs::create_dir_all(&self.a.out).with_context(|| format!("cannot create {}", self.a.out.display()))?;
        let mut log = std::fs::File::create(self.a.out.join("log.jsonl")).context("cannot write log.jsonl")?;
        let bar = ProgressBar::new(self.total as u64);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} updates {msg} ({eta})").unwrap_or_else(|_| ProgressStyle::default_bar()));
        bar.set_position(trainer.updates() as u64);
        while trainer.updates() < self.total {
            let u = trainer.updates();
            let t = Instant::now();
            let items = self.batch(u).iter().map(|ex| trainer.item(ex, self.task)).collect::<phi4mm::Result<Vec<_>>>()?;
            let st = trainer.step(&items, self.total)?;
            let tok_s = st.tokens as f64 / t.elapsed().as_secs_f64();
            bar.set_message(format!("loss {:.4} lr {:.2e} {tok_s:.0} tok/s", st.loss, st.lr));
            bar.inc(1);
            let mut rec = serde_json::json!({"update": u + 1, "epoch": u / self.per_epoch + 1, "loss": st.loss, "grad_norm": st.grad_norm, "lr": st.lr, "tokens": st.tokens, "seconds": t.elapsed().as_secs_f64(), "peak_rss_bytes": crate::common::peak_rss_bytes()});
            let every = if self.a.eval_every > 0 { self.a.eval_every } else { self.per_epoch };
            if let Some(held) = self.held.filter(|_| (u + 1) % every == 0 || u + 1 == self.total) {
                let items = held.iter().map(|ex| trainer.item(ex, self.task)).collect::<phi4mm::Result<Vec<_>>>()?;
                let l = trainer.loss(&items)?;
                bar.println(format!("update {}: eval loss {l:.4}", u + 1));
                rec["eval_loss"] = l.into();
            }
            writeln!(log, "{rec}")?;
            if self.a.save_every > 0 && (u + 1) % self.a.save_every == 0 {
                save(trainer, &self.a.out.join(format!("checkpoint-{}", u + 1)), &self.a.model.model)?;
            }
        }
        bar.finish();
        Ok(())
    }

    /// The examples of update `u`: each epoch visits every example once, in an order shuffled
    /// by the seed and the epoch.
    fn batch(&self, u: usize) -> Vec<&Example> {
        let (epoch, k) = (u / self.per_epoch, u % self.per_epoch);
        let order = shuffled(self.train.len(), self.a.seed.wrapping_add(epoch as u64));
        order.iter().skip(k * self.a.batch_size).take(self.a.batch_size).map(|&i| &self.train[i]).collect()
    }
}

/// 0..n in a seeded Fisher–Yates order.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed ^ 0x2545_F491_4F6C_DD1D;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// The adapter (PEFT layout) and the optimizer state, into `dir`.
fn save(trainer: &Trainer, dir: &Path, base_model: &str) -> Result<()> {
    let (rank, alpha) = trainer.rank_alpha();
    let info = AdapterInfo { mode: trainer.options().adapter.name().to_string(), rank, alpha, base_model: base_model.to_string() };
    adapter::save(dir, &info, &trainer.parameters())?;
    trainer.save_state(dir)?;
    Ok(())
}

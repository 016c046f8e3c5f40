//! Options shared by every subcommand: which model, which dtype, how many threads.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use phi4mm::{DType, Device, Engine, LoadOptions};

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory, or a hub id resolved in the Hugging Face cache.
    #[arg(long, short = 'm', default_value = phi4mm::model::hub::OFFICIAL_ID)]
    pub model: String,
    /// Compute dtype: bf16 (default, fits the full model in 24 GiB), f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Worker threads (default: one per physical core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device: cpu, or cuda[:N] in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Quantise the decoder's weights at load: none (as stored), q8_0, q6_0 or q4_0 (CPU only).
    /// A checkpoint written by `phi4mm quantize` loads in its own format without this.
    #[arg(long, default_value = "none")]
    pub quant: String,
    /// KV cache: auto (the compute dtype) or q8 (8-bit, half of bf16's memory; CPU only).
    #[arg(long, default_value = "auto")]
    pub kv_cache: String,
    /// Load only the text decoder: no image or audio encoder, no LoRA adapters (less memory).
    #[arg(long)]
    pub text_only: bool,
    /// Use a fine-tuned adapter in place of the checkpoint's: `speech=DIR` or `vision=DIR`
    /// (a folder written by `phi4mm finetune`, or a PEFT adapter of this model). Repeatable.
    #[arg(long, value_name = "MODE=DIR")]
    pub adapter: Vec<String>,
}

/// `speech=DIR` / `vision=DIR`.
pub fn parse_adapter(s: &str) -> Result<(phi4mm::decoder::lora::Adapter, PathBuf)> {
    use phi4mm::decoder::lora::Adapter;
    let (mode, dir) = s.split_once('=').with_context(|| format!("--adapter `{s}`: use speech=DIR or vision=DIR"))?;
    let adapter = match mode.trim() {
        "speech" => Adapter::Speech,
        "vision" => Adapter::Vision,
        other => bail!("--adapter `{s}`: unknown mode `{other}` (speech or vision)"),
    };
    Ok((adapter, PathBuf::from(dir)))
}

impl ModelArgs {
    pub fn dtype(&self) -> Result<DType> {
        Ok(match self.dtype.as_str() {
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => bail!("unknown --dtype `{other}` (use f32, bf16 or f16)"),
        })
    }

    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal = d.strip_prefix("cuda:").map_or(Ok(0), str::parse).context("bad cuda ordinal")?;
                Device::new_cuda(ordinal).with_context(|| {
                    "cannot open the CUDA device (is this a build with `--features cuda`?)"
                })
            }
            other => bail!("unknown --device `{other}` (use cpu or cuda[:N])"),
        }
    }

    /// Sets the thread count before the backend starts its pool.
    pub fn apply_threads(&self) {
        if let Some(n) = self.threads {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }

    /// Resolves and loads the model with a loading bar, without the audio bar (the server).
    pub fn load_plain(&self) -> Result<Engine> {
        self.load_engine().map(|(e, _)| e)
    }

    /// Resolves and loads the model, with progress bars on a terminal (loading; long audio).
    pub fn load(&self) -> Result<(Engine, f64)> {
        let (mut engine, secs) = self.load_engine()?;
        // A progress bar for long audio (more than one 40-second window).
        let audio_bar = ProgressBar::new(0);
        audio_bar.set_style(
            ProgressStyle::with_template("encoding audio {bar:40} {pos}/{len} windows ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        engine.set_encode_progress(Box::new(move |done, total| {
            if total > 1 {
                audio_bar.set_length(total as u64);
                audio_bar.set_position(done as u64);
                if done == total {
                    audio_bar.finish_and_clear();
                }
            }
        }));
        Ok((engine, secs))
    }

    fn load_engine(&self) -> Result<(Engine, f64)> {
        self.apply_threads();
        let dir: PathBuf = phi4mm::model::hub::resolve_model(&self.model)?;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("loading {msg} {bar:40} {bytes}/{total_bytes} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(dir.display().to_string());
        let b = bar.clone();
        let opts = LoadOptions {
            dtype: self.dtype()?,
            device: self.device()?,
            quant: phi4mm::model::quant::QType::parse(&self.quant)?,
            kv_cache: phi4mm::decoder::kv_cache::KvFormat::parse(&self.kv_cache)?,
            text_only: self.text_only,
            progress: Some(Box::new(move |done, total| {
                b.set_length(total);
                b.set_position(done);
            })),
        };
        let adapters = self.adapter.iter().map(|a| parse_adapter(a)).collect::<Result<Vec<_>>>()?;
        if self.text_only && !adapters.is_empty() {
            bail!("--adapter needs the adapters' encoders: drop --text-only");
        }
        let t = Instant::now();
        let mut engine = Engine::load(&dir, opts).with_context(|| format!("loading {}", dir.display()))?;
        bar.finish_and_clear();
        for (adapter, path) in adapters {
            engine.load_adapter(adapter, &path)?;
            tracing::info!("{} adapter from {}", adapter.name(), path.display());
        }
        Ok((engine, t.elapsed().as_secs_f64()))
    }
}

/// Peak resident memory of this process in bytes (Linux), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A generation callback that streams each step's text to stdout (unless `quiet`).
pub fn stream_stdout(quiet: bool) -> impl FnMut(&phi4mm::Step) -> bool {
    move |step| {
        if !quiet {
            print_piece(step.text);
        }
        true
    }
}

/// Writes a piece of streamed text to stdout at once.
pub fn print_piece(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The scheduler's defaults for `engine`, with `--kv-budget` and `--prepare-share` if given.
pub fn scheduler_options(engine: &phi4mm::Engine, kv_budget: Option<&str>, prepare_share: Option<f64>) -> anyhow::Result<phi4mm::SchedulerOptions> {
    let mut o = phi4mm::SchedulerOptions::for_engine(engine);
    if let Some(b) = kv_budget {
        o.kv_budget = phi4mm::SchedulerOptions::parse_kv_budget(engine, b)?;
    }
    if let Some(s) = prepare_share {
        o.prepare_share = s;
    }
    Ok(o)
}

/// `--prepare-share`: a positive, finite number.
pub fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number")),
    }
}

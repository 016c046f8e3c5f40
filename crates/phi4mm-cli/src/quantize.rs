//! `phi4mm quantize`: writes a copy of a checkpoint with the decoder's weights quantised, which
//! later loads by memory map in that format (no `--quant` needed).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Source model directory, or a hub id resolved in the Hugging Face cache.
    #[arg(long, short = 'm', default_value = phi4mm::model::hub::OFFICIAL_ID)]
    pub model: String,
    /// Format: q8_0, q6_0 or q4_0.
    #[arg(long, default_value = "q4_0")]
    pub quant: String,
    /// Output directory (created; must not hold a model.safetensors yet).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Worker threads (default: one per physical core).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    if let Some(n) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let qtype = phi4mm::model::quant::QType::parse(&a.quant)?
        .with_context(|| format!("--quant {} is not a quantised format (use q8_0, q6_0 or q4_0)", a.quant))?;
    let src = phi4mm::model::hub::resolve_model(&a.model)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("quantising {bar:40} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let t = std::time::Instant::now();
    let s = phi4mm::model::quant_file::quantize_checkpoint(
        &src,
        qtype,
        &a.out,
        Some(Box::new(move |done, total| {
            b.set_length(total);
            b.set_position(done);
        })),
    )
    .with_context(|| format!("quantising {}", src.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({:.2} GiB, {} matrices quantised: projections {}, LM head {}, LoRA adapters q8_0; {} tensors copied) in {:.1} s",
        s.path.display(),
        s.bytes as f64 / (1u64 << 30) as f64,
        s.quantized_tensors,
        qtype.name(),
        qtype.head_format().name(),
        s.copied_tensors,
        t.elapsed().as_secs_f64()
    );
    println!("run it with: phi4mm run --model {} \"Hello\"", a.out.display());
    Ok(())
}

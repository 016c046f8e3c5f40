//! `phi4mm bench`: prefill and decode speed on a synthetic prompt, with the settings that
//! produced them.

use anyhow::Result;
use clap::Args;
use phi4mm::engine::Prepared;
use phi4mm::{GenerateRequest, PromptInput};

use crate::common::{peak_rss_bytes, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate (end-of-sequence ignored).
    #[arg(long, default_value_t = 32)]
    pub gen_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens > 0 && a.gen_tokens > 0, "token counts must be positive");
    let (engine, load_s) = a.model.load()?;
    // Deterministic pseudo-random ids from the base vocabulary (no special tokens).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let ids: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % 199_998) as u32
        })
        .collect();
    let mut req = GenerateRequest::new(PromptInput::Raw(String::new()));
    req.max_new_tokens = a.gen_tokens;
    req.ignore_eos = true;
    let prepared = Prepared::text(ids);
    let c = engine.generate_prepared(&prepared, &req, |_| true)?;
    let report = serde_json::json!({
        "engine": "phi4mm",
        "model": engine.model_dir().display().to_string(),
        "device": a.model.device,
        "dtype": a.model.dtype,
        "format": a.model.dtype,
        "threads": candle_threads(),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": c.tokens.len(),
        "load_s": load_s,
        "prefill_tok_s": c.timings.prefill_tok_s,
        "decode_tok_s": c.timings.decode_tok_s,
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        "commit": env!("PHI4MM_GIT_COMMIT"),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("model       {}", engine.model_dir().display());
        println!("device      {}  dtype {}  threads {}", a.model.device, a.model.dtype, candle_threads());
        println!("load        {load_s:.2} s");
        println!("prefill     {:>8.2} tok/s  ({} tokens)", c.timings.prefill_tok_s, a.prompt_tokens);
        println!("decode      {:>8.2} tok/s  ({} tokens)", c.timings.decode_tok_s, c.timings.decode_tokens);
        if let Some(b) = peak_rss_bytes() {
            println!("peak RSS    {:.0} MiB", b as f64 / (1024.0 * 1024.0));
        }
        println!("commit      {}", env!("PHI4MM_GIT_COMMIT"));
    }
    Ok(())
}

fn candle_threads() -> usize {
    phi4mm::threads()
}

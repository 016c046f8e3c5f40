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
    /// Also time this image: preprocessing + image encoder, and time to first token for the
    /// model card's prompt `<|image_1|>What is shown in this image?`.
    #[arg(long)]
    pub image: Option<std::path::PathBuf>,
    /// Also time this audio file: decoding + features, and the speech encoder + projector
    /// (real-time factor = encode time / audio duration).
    #[arg(long)]
    pub audio: Option<std::path::PathBuf>,
    /// Skip the text prefill/decode measurement (only media timings).
    #[arg(long)]
    pub media_only: bool,
    /// Also measure memory and decode speed with a KV cache of this many positions (e.g.
    /// 131072): a real 512-token prefill whose keys and values are repeated to fill the cache,
    /// then `--gen-tokens` decode steps at the end of it (a real prefill that long takes hours
    /// on a laptop CPU).
    #[arg(long)]
    pub context: Option<usize>,
    /// Run N synthetic requests at once through the scheduler and report aggregate and
    /// per-stream decode tok/s, time to first token and inter-token latency (p50/p99).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// What the concurrent streams are, cycled: text, vision-lora, speech-lora (synthetic
    /// prompts decoded with that adapter), image (--image), audio (--audio).
    #[arg(long, default_value = "text")]
    pub mix: String,
    /// With --concurrency: requests admitted once the streams are decoding (same kinds as
    /// --mix); reports the streams' inter-token latency while they are encoded and prefilled.
    #[arg(long, default_value = "")]
    pub late: String,
    /// Time turn 2 of a conversation about --image and/or --audio: time to first token
    /// without and with the prefix cache (same tokens either way).
    #[arg(long)]
    pub turn2: bool,
    /// KV budget for --concurrency / --turn2: GiB (`8`, `8GiB`, `512MiB`) or positions
    /// (`20000tok`); default half the available memory.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// With --concurrency: the scheduler's preparation time per step as a share of the decode
    /// step's (default 0.8; more gives waiting requests their first token sooner, at the
    /// running streams' inter-token latency).
    #[arg(long, value_parser = crate::common::parse_share)]
    pub prepare_share: Option<f64>,
    /// Run the audio and image encoders this many times and report the fastest (a noisy host;
    /// every time is in the JSON).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
}

/// `f` run `n` times: the fastest time and every time, in seconds.
fn timed(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>)> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let t = std::time::Instant::now();
        f()?;
        all.push(t.elapsed().as_secs_f64());
    }
    Ok((all.iter().cloned().fold(f64::INFINITY, f64::min), all))
}

/// Decode speed and memory with a KV cache holding `ctx` positions.
fn bench_context(engine: &phi4mm::Engine, ctx: usize, gen: usize, ids: &[u32]) -> Result<serde_json::Value> {
    let dec = engine.decoder();
    let prefill = ids.len().min(512).min(ctx / 2).max(1);
    anyhow::ensure!(ctx > prefill + gen, "--context must exceed the prompt and the generated tokens");
    let mut cache = dec.new_cache(ctx)?;
    dec.forward(&dec.embed(&ids[..prefill])?, &mut cache, None, None)?;
    cache.repeat_to(ctx - gen, dec.rope().is_long(ctx))?;
    let mut tok = ids[0];
    let t = std::time::Instant::now();
    for _ in 0..gen {
        let h = dec.forward(&dec.embed(&[tok])?, &mut cache, None, None)?;
        let logits = dec.logits(&h)?;
        tok = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
    }
    let decode_tok_s = gen as f64 / t.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "context": ctx,
        "kv_cache": format!("{:?}", cache.format()).to_lowercase(),
        "kv_cache_gib": cache.nbytes() as f64 / (1u64 << 30) as f64,
        "decode_tok_s": decode_tok_s,
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / 1048576.0),
    }))
}

/// Feature and encoder time for one audio file.
fn bench_audio(engine: &phi4mm::Engine, path: &std::path::Path, repeat: usize) -> Result<serde_json::Value> {
    use phi4mm::{MediaInput, Message};
    let mut req = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", "<|audio_1|>Transcribe the audio clip into text.")]));
    req.audios = vec![MediaInput::Path(path.to_path_buf())];
    req.max_new_tokens = 1;
    let rss_before = peak_rss_bytes();
    let t0 = std::time::Instant::now();
    let prepared = engine.prepare(&req)?;
    let features_s = t0.elapsed().as_secs_f64();
    let feats = &prepared.audios[0];
    let seconds = (feats.frames - 1) as f64 * 0.01 + 0.025;
    let audio = engine.audio().ok_or_else(|| anyhow::anyhow!("no audio encoder in this checkpoint"))?;
    let (encode_s, all) = timed(repeat, || {
        let out = audio.encode(std::slice::from_ref(feats), None)?;
        audio.project(&out[0], phi4mm::audio::Projector::Speech)?;
        Ok(())
    })?;
    Ok(serde_json::json!({
        "audio": path.display().to_string(),
        "seconds": seconds,
        "audio_tokens": feats.num_tokens(),
        "features_s": features_s,
        "encode_s": encode_s,
        "encode_s_all": all,
        "rtf": encode_s / seconds,
        "peak_rss_mib_before": rss_before.map(|b| b as f64 / 1048576.0),
        "peak_rss_mib_after": peak_rss_bytes().map(|b| b as f64 / 1048576.0),
    }))
}

/// Image encode time and time to first token for the model card's image prompt.
fn bench_image(engine: &phi4mm::Engine, path: &std::path::Path, repeat: usize) -> Result<serde_json::Value> {
    use phi4mm::{MediaInput, Message};
    let mut req = GenerateRequest::new(PromptInput::Chat(vec![Message::new(
        "user",
        "<|image_1|>What is shown in this image?",
    )]));
    req.images = vec![MediaInput::Path(path.to_path_buf())];
    req.max_new_tokens = 1;
    let t0 = std::time::Instant::now();
    let prepared = engine.prepare(&req)?;
    let prep_s = t0.elapsed().as_secs_f64();
    let vision = engine.vision().ok_or_else(|| anyhow::anyhow!("no image encoder in this checkpoint"))?;
    let img = &prepared.images[0];
    let (encode_s, all) = timed(repeat, || {
        vision.encode(img)?;
        Ok(())
    })?;
    let t2 = std::time::Instant::now();
    engine.generate_prepared(&prepared, &req, |_| true)?;
    let ttft_s = t2.elapsed().as_secs_f64() + prep_s;
    Ok(serde_json::json!({
        "image": path.display().to_string(),
        "crops": img.crops() + 1,
        "image_tokens": img.num_tokens,
        "prompt_tokens": prepared.ids.len(),
        "preprocess_s": prep_s,
        "image_encode_s": encode_s,
        "image_encode_s_all": all,
        "ttft_s": ttft_s,
    }))
}

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens > 0 && a.gen_tokens > 0, "token counts must be positive");
    let (engine, load_s) = a.model.load()?;
    if let Some(n) = a.concurrency {
        return run_batch(&a, &engine, n, load_s);
    }
    if a.turn2 {
        return run_turn2(&a, &engine, load_s);
    }
    let ids = crate::bench_batch::synthetic_ids(a.prompt_tokens, 0);
    let mut req = GenerateRequest::new(PromptInput::Raw(String::new()));
    req.max_new_tokens = a.gen_tokens;
    req.ignore_eos = true;
    let prepared = Prepared::text(ids.clone());
    let c = if a.media_only || a.context.is_some() {
        None
    } else {
        Some(engine.generate_prepared(&prepared, &req, |_| true)?)
    };
    let audio = match &a.audio {
        Some(p) => Some(bench_audio(&engine, p, a.repeat)?),
        None => None,
    };
    let image = match &a.image {
        Some(p) => Some(bench_image(&engine, p, a.repeat)?),
        None => None,
    };
    let context = match a.context {
        Some(n) => Some(bench_context(&engine, n, a.gen_tokens, &ids)?),
        None => None,
    };
    let report = serde_json::json!({
        "context": context,
        "image": image,
        "audio": audio,
        "engine": "phi4mm",
        "model": engine.model_dir().display().to_string(),
        "device": a.model.device,
        "dtype": a.model.dtype,
        "format": engine.format(),
        "decoder_gib": engine.decoder_bytes().0 as f64 / (1u64 << 30) as f64,
        "threads": candle_threads(),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": c.as_ref().map(|c| c.tokens.len()),
        "load_s": load_s,
        "prefill_tok_s": c.as_ref().map(|c| c.timings.prefill_tok_s),
        "decode_tok_s": c.as_ref().map(|c| c.timings.decode_tok_s),
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        "commit": env!("PHI4MM_GIT_COMMIT"),
    });
    if a.json {
        println!("{report}");
    } else {
        println!("model       {}", engine.model_dir().display());
        println!(
            "device      {}  dtype {}  weights {} ({:.2} GiB)  threads {}",
            a.model.device,
            a.model.dtype,
            engine.format(),
            engine.decoder_bytes().0 as f64 / (1u64 << 30) as f64,
            candle_threads()
        );
        println!("load        {load_s:.2} s");
        if let Some(c) = &c {
            println!("prefill     {:>8.2} tok/s  ({} tokens)", c.timings.prefill_tok_s, a.prompt_tokens);
            println!("decode      {:>8.2} tok/s  ({} tokens)", c.timings.decode_tok_s, c.timings.decode_tokens);
        }
        if let Some(au) = &audio {
            println!(
                "audio       {:.1} s, {} tokens: features {:.2} s, encoder {:.2} s, real-time factor {:.4}",
                au["seconds"].as_f64().unwrap_or(0.0), au["audio_tokens"], au["features_s"].as_f64().unwrap_or(0.0),
                au["encode_s"].as_f64().unwrap_or(0.0), au["rtf"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(cx) = &context {
            println!(
                "context     {} positions, {} KV cache {:.2} GiB: decode {:.3} tok/s",
                cx["context"], cx["kv_cache"].as_str().unwrap_or(""), cx["kv_cache_gib"].as_f64().unwrap_or(0.0),
                cx["decode_tok_s"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(b) = peak_rss_bytes() {
            println!("peak RSS    {:.0} MiB", b as f64 / (1024.0 * 1024.0));
        }
        if let Some(img) = &image {
            println!(
                "image       {} crops, {} tokens: encode {:.2} s, time to first token {:.2} s ({} prompt tokens)",
                img["crops"], img["image_tokens"], img["image_encode_s"].as_f64().unwrap_or(0.0),
                img["ttft_s"].as_f64().unwrap_or(0.0), img["prompt_tokens"]
            );
        }
        println!("commit      {}", env!("PHI4MM_GIT_COMMIT"));
    }
    Ok(())
}

/// `--concurrency N`: the scheduler's batched run, printed as JSON or a few lines.
fn run_batch(a: &BenchArgs, engine: &phi4mm::Engine, n: usize, load_s: f64) -> Result<()> {
    use crate::bench_batch::{BatchBench, Kind};
    let b = BatchBench {
        concurrency: n,
        mix: Kind::parse_list(&a.mix)?,
        late: Kind::parse_list(&a.late)?,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        image: a.image.as_deref(),
        audio: a.audio.as_deref(),
        opts: crate::common::scheduler_options(engine, a.kv_budget.as_deref(), a.prepare_share)?,
    };
    let mut r = b.run(engine)?;
    if stamped(&mut r, engine, load_s, a.json) {
        return Ok(());
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("weights     {}  threads {}  streams {n} ({})", engine.format(), candle_threads(), a.mix);
    println!("decode      {:.2} tok/s aggregate, {:.2} per stream", f("aggregate_decode_tok_s"), f("per_stream_decode_tok_s"));
    println!("TTFT        p50 {:.3} s  p99 {:.3} s", f("ttft_s_p50"), f("ttft_s_p99"));
    println!("ITL         p50 {:.4} s  p99 {:.4} s  (unloaded step {:.4} s)", f("itl_s_p50"), f("itl_s_p99"), f("unloaded_step_s"));
    if !b.late.is_empty() {
        println!("admitting   ITL p50 {:.4} s  p99 {:.4} s while {} joined", f("itl_while_admitting_s_p50"), f("itl_while_admitting_s_p99"), a.late);
    }
    println!("peak RSS    {:.0} MiB", f("peak_rss_mib"));
    Ok(())
}

/// Adds the run's settings to report `r`; prints it and returns true under `--json`.
fn stamped(r: &mut serde_json::Value, engine: &phi4mm::Engine, load_s: f64, json: bool) -> bool {
    r["format"] = engine.format().into();
    r["threads"] = candle_threads().into();
    r["load_s"] = load_s.into();
    r["commit"] = env!("PHI4MM_GIT_COMMIT").into();
    if json {
        println!("{r}");
    }
    json
}

/// `--turn2`: the prefix cache's time to first token on a conversation's second turn.
fn run_turn2(a: &BenchArgs, engine: &phi4mm::Engine, load_s: f64) -> Result<()> {
    let opts = crate::common::scheduler_options(engine, a.kv_budget.as_deref(), a.prepare_share)?;
    let mut r = crate::bench_prefix::run(engine, opts, a.image.as_deref(), a.audio.as_deref(), a.gen_tokens)?;
    if stamped(&mut r, engine, load_s, a.json) {
        return Ok(());
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!("weights     {}  threads {}", engine.format(), candle_threads());
    println!("turn 1      {} prompt tokens, TTFT {:.2} s", r["turn1_prompt_tokens"], f("turn1_ttft_s"));
    println!("turn 2      {} prompt tokens, {} from the prefix cache", r["turn2_prompt_tokens"], r["turn2_cached_tokens"]);
    println!("TTFT        cold {:.2} s  warm {:.2} s  ratio {:.1}x", f("turn2_ttft_cold_s"), f("turn2_ttft_warm_s"), f("ttft_ratio"));
    println!("same output {}", r["same_tokens_and_logprobs"]);
    Ok(())
}

fn candle_threads() -> usize {
    phi4mm::threads()
}

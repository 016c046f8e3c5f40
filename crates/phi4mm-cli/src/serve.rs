//! `phi4mm serve`: the OpenAI-compatible server (the `phi4mm-server` crate) on this model.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use clap::Args;
use phi4mm_server::ServerConfig;

use crate::common::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (its first line).
    #[arg(long)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_seqs: usize,
    /// Most requests waiting for a slot; one more is answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// KV budget: GiB (`8`, `8GiB`), MiB (`512MiB`) or positions (`20000tok`); default half the
    /// available memory.
    #[arg(long)]
    pub kv_budget: Option<String>,
    /// Preparation (media encoding and prefill) time per scheduler step as a share of the decode
    /// step's: 0.8 by default; more gives waiting requests their first token sooner, at the
    /// running streams' inter-token latency.
    #[arg(long, value_parser = crate::common::parse_share)]
    pub prepare_share: Option<f64>,
    /// The model name clients send and /v1/models lists (`vision` and `speech` force an adapter).
    #[arg(long, default_value = phi4mm::model::hub::OFFICIAL_ID)]
    pub served_model_name: String,
    /// Most media per request, e.g. `image=8,audio=4`.
    #[arg(long, default_value = "image=8,audio=4")]
    pub limit_mm_per_prompt: String,
    /// `max_tokens` when a request gives none (capped by the context left).
    #[arg(long, default_value_t = 4096)]
    pub default_max_tokens: usize,
    /// Largest request body in MiB (larger is 413).
    #[arg(long, default_value_t = 64)]
    pub max_body_mib: usize,
    /// Allow browser requests from this origin (repeatable).
    #[arg(long)]
    pub cors_origin: Vec<String>,
    /// Fetch http(s) media only from these hosts (comma-separated or repeated); they may be
    /// private addresses, which are refused for every other host.
    #[arg(long, value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// Let requests name local files (paths or file:// URLs) under this directory.
    #[arg(long)]
    pub allowed_local_media_path: Option<std::path::PathBuf>,
    /// Do not serve the chat page at `/` (the API only).
    #[arg(long)]
    pub no_ui: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port).parse().with_context(|| format!("bad --host/--port `{}:{}`", a.host, a.port))?;
    let mut config = ServerConfig { served_model_name: a.served_model_name.clone(), cors_origins: a.cors_origin.clone(), ui: !a.no_ui, ..ServerConfig::default() };
    config.api_key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let s = std::fs::read_to_string(f).with_context(|| format!("reading --api-key-file {}", f.display()))?;
            Some(s.lines().next().unwrap_or("").trim().to_string()).filter(|k| !k.is_empty())
        }
        (None, None) => None,
    };
    if a.api_key_file.is_some() && config.api_key.is_none() {
        bail!("--api-key-file holds no key");
    }
    parse_media_limits(&a.limit_mm_per_prompt, &mut config.limits)?;
    config.limits.default_max_tokens = a.default_max_tokens.max(1);
    config.max_body_bytes = a.max_body_mib.max(1) << 20;
    config.media.allowed_domains = a.allowed_media_domains.iter().map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect();
    if let Some(dir) = &a.allowed_local_media_path {
        if !dir.is_dir() {
            bail!("--allowed-local-media-path {} is not a directory", dir.display());
        }
        config.media.local_root = Some(dir.clone());
    }
    let model = a.model;
    model.apply_threads();
    let (max_seqs, max_queue, kv_budget, prepare_share) = (a.max_seqs.max(1), a.max_queue, a.kv_budget, a.prepare_share);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    eprintln!("phi4mm serve: listening on http://{addr} (/health answers 503 until the model is loaded)");
    if !a.no_ui {
        eprintln!("phi4mm serve: chat page at http://{addr}/");
    }
    rt.block_on(phi4mm_server::serve(
        addr,
        config,
        move |engine| {
            let mut o = phi4mm::SchedulerOptions::for_engine(engine);
            if let Some(b) = kv_budget.as_deref() {
                match phi4mm::SchedulerOptions::parse_kv_budget(engine, b) {
                    Ok(v) => o.kv_budget = v,
                    Err(e) => eprintln!("warning: {e}; using the default KV budget"),
                }
            }
            if let Some(share) = prepare_share {
                o.prepare_share = share;
            }
            o.max_batch = max_seqs;
            o.max_queue = max_queue;
            o
        },
        move || {
            let engine = model.load_plain().map_err(|e| phi4mm::Error::Request(format!("{e:#}")))?;
            eprintln!("phi4mm serve: model loaded ({})", engine.format());
            Ok(engine)
        },
    ))
    .context("the server stopped")
}

/// `image=N,audio=N` into the limits.
fn parse_media_limits(s: &str, l: &mut phi4mm_server::wire::Limits) -> Result<()> {
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=').with_context(|| format!("bad --limit-mm-per-prompt `{part}` (use image=N,audio=N)"))?;
        let n: usize = v.trim().parse().with_context(|| format!("bad count in --limit-mm-per-prompt `{part}`"))?;
        match k.trim() {
            "image" => l.images = n,
            "audio" => l.audios = n,
            other => bail!("unknown media kind `{other}` in --limit-mm-per-prompt (image, audio)"),
        }
    }
    Ok(())
}

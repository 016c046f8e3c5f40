//! `phi4mm`: run Phi-4-multimodal-instruct from the command line.
//!
//! `run` answers one prompt, `chat` keeps a conversation, `bench` measures speed, `quantize`
//! writes a quantised copy of a checkpoint, `serve` is the HTTP API, `eval` scores a set,
//! `finetune` trains an adapter. Arguments are
//! validated here into library requests; everything else happens in the `phi4mm` crate.

mod bench;
mod bench_batch;
mod bench_prefix;
mod chat;
mod common;
mod eval;
mod finetune;
mod quantize;
mod run;
mod serve;
mod transcribe;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "phi4mm", version, about = "Run Microsoft Phi-4-multimodal-instruct natively")]
struct Cli {
    /// More logging (-v debug, -vv trace); RUST_LOG also works.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt (streams the reply to stdout).
    Run(run::RunArgs),
    /// Interactive multi-turn chat.
    Chat(chat::ChatArgs),
    /// Measure prefill and decode speed.
    Bench(bench::BenchArgs),
    /// Transcribe (and optionally translate) an audio file.
    Transcribe(transcribe::TranscribeArgs),
    /// Write a copy of a checkpoint with quantised decoder weights (q8_0, q4_0).
    Quantize(quantize::QuantizeArgs),
    /// Serve the OpenAI-compatible HTTP API (chat, completions, tokenize, models, health).
    Serve(serve::ServeArgs),
    /// Run the model over a JSON-lines set and score it (WER, CER, BLEU, accuracy), or score
    /// existing predictions.
    Eval(eval::EvalArgs),
    /// Fine-tune the speech or vision LoRA adapter on a JSON-lines set.
    Finetune(finetune::FinetuneArgs),
}

/// Keeps freed memory in the process (glibc). Prefill's tensors are tens of MB each; by default
/// glibc maps every block that large afresh and unmaps it on free, so each op paid page faults
/// and zeroing again: `phi4mm bench --prompt-tokens 512` went from 37–38 to 44–45 tok/s (Q4_0,
/// 2 threads) with blocks kept, for 80 MiB more peak RSS.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists (only argument parsing ran before).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    let cli = Cli::parse();
    // Training frees and reallocates gigabytes of gradients every update: there glibc's own
    // thresholds return them to the system instead of keeping them resident.
    if !matches!(cli.command, Command::Finetune(_)) {
        keep_freed_memory();
    }
    let level = match cli.verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("phi4mm={level},phi4mm_server={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Transcribe(a) => transcribe::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Finetune(a) => finetune::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

//! `phi4mm run`: one prompt in, the reply streamed out (or one JSON object with `--json`).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use phi4mm::{GenerateRequest, MediaInput, Message, PromptInput, SamplingParams};

use crate::common::{stream_stdout, ModelArgs};

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// JSON file with tool definitions (a list), placed in the system turn.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// Image file; repeat for several. Bound in order to <|image_N|> markers in the prompt.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// A directory of video frames (image files, taken in name order, at most 64); each frame
    /// is one image. The crop cap per frame shrinks as needed to fit the context.
    #[arg(long)]
    pub frames: Option<PathBuf>,
    /// Audio file; repeat for several. Bound in order to <|audio_N|> markers in the prompt.
    #[arg(long = "audio")]
    pub audios: Vec<PathBuf>,
    /// Print one JSON object (text, ids, logprobs, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// PROMPT is a complete prompt string: no chat template.
    #[arg(long)]
    pub raw: bool,
    /// The user message ("-" reads standard input).
    pub prompt: String,
}

/// Sampling and length options shared by `run` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy (the model's default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Drop tokens below this fraction of the best one's probability (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// OpenAI's presence penalty (-2..2) over the generated tokens.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty (-2..2) over the generated tokens.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable); it is not included in the output.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
    /// Most 448-px crops per image (default: the model's `dynamic_hd`, 36; at most 64).
    #[arg(long)]
    pub max_crops: Option<usize>,
}

impl GenArgs {
    pub fn request(&self, prompt: PromptInput) -> GenerateRequest {
        let mut req = GenerateRequest::new(prompt);
        req.sampling = SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: Vec::new(),
            seed: self.seed,
        };
        req.max_new_tokens = self.max_new_tokens;
        req.stop = self.stop.clone();
        req.ignore_eos = self.ignore_eos;
        req.max_crops = self.max_crops;
        req
    }
}

/// The system message with tools, if any (`tools` as Python's json.dumps writes it).
pub fn system_message(system: Option<&str>, tools: Option<&PathBuf>) -> Result<Option<Message>> {
    let tools = match tools {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read tools file {}", p.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("tools file {} is not valid JSON", p.display()))?;
            Some(phi4mm::text::tokenizer::python_json(&v))
        }
        None => None,
    };
    if system.is_none() && tools.is_none() {
        return Ok(None);
    }
    let mut m = Message::new("system", system.unwrap_or(""));
    m.tools = tools;
    Ok(Some(m))
}

/// Image files of a frames directory, in name order.
fn frame_files(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    const EXT: [&str; 9] = ["jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "ppm"];
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read frames directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXT.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no image files in {}", dir.display());
    anyhow::ensure!(files.len() <= 64, "{} frames in {}; at most 64", files.len(), dir.display());
    Ok(files)
}

pub fn run(mut a: RunArgs) -> Result<()> {
    if let Some(dir) = a.frames.take() {
        a.images.extend(frame_files(&dir)?);
    }
    let prompt_text = if a.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
        s
    } else {
        a.prompt.clone()
    };
    for p in a.images.iter().chain(&a.audios) {
        std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    }
    let prompt = if a.raw {
        PromptInput::Raw(prompt_text)
    } else {
        let mut msgs = Vec::new();
        if let Some(m) = system_message(a.system.as_deref(), a.tools.as_ref())? {
            msgs.push(m);
        }
        let content = phi4mm::text::prompt::user_content(&prompt_text, a.images.len(), a.audios.len())?;
        msgs.push(Message::new("user", content));
        PromptInput::Chat(msgs)
    };
    let mut req = a.gen.request(prompt);
    req.images = a.images.iter().cloned().map(MediaInput::Path).collect();
    req.audios = a.audios.iter().cloned().map(MediaInput::Path).collect();
    req.top_logprobs = if a.json { 5 } else { 0 };

    let (engine, _) = a.model.load()?;
    let prepared = engine.prepare(&req)?;
    if !prepared.images.is_empty() {
        let tokens: usize = prepared.images.iter().map(|i| i.num_tokens).sum();
        eprintln!(
            "{} image(s): {tokens} image tokens, at most {} crops per image{}",
            prepared.images.len(),
            prepared.max_crops,
            if req.max_crops.is_none() && prepared.max_crops < 36 { " (lowered to fit the context)" } else { "" }
        );
    }
    let completion = engine.generate_prepared(&prepared, &req, stream_stdout(a.json))?;
    if a.json {
        println!("{}", serde_json::to_string(&completion)?);
    } else {
        println!();
        tracing::info!(
            prefill_tok_s = completion.timings.prefill_tok_s,
            decode_tok_s = completion.timings.decode_tok_s,
            "done"
        );
    }
    Ok(())
}

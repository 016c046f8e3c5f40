//! The request and result types of a generation: what goes in (prompt, media, sampling and
//! length settings), the tokenised form the engine prepares, and what comes out (streamed steps
//! and the final completion with its timings).

use std::path::PathBuf;

use crate::audio::audio_features::LogMel;
use crate::vision::image_prep::PreparedImage;
use crate::text::prompt::Mode;
use crate::text::sampler::{MaskHook, SamplingParams, TokenLogprob};
use crate::text::tokenizer::Message;

/// The prompt of a request.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Messages rendered with the model's chat template (generation prompt appended).
    Chat(Vec<Message>),
    /// A complete prompt string, used as is.
    Raw(String),
}

/// An image or audio input.
#[derive(Debug, Clone)]
pub enum MediaInput {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

/// Everything a generation needs.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: PromptInput,
    pub images: Vec<MediaInput>,
    pub audios: Vec<MediaInput>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// How many alternatives to report per generated token.
    pub top_logprobs: usize,
    /// Keep generating past the end-of-sequence ids (benchmarks, parity tests).
    pub ignore_eos: bool,
    /// Most crops per image (default: `dynamic_hd` of preprocessor_config.json, 36).
    pub max_crops: Option<usize>,
    /// Restricts each next token (a grammar); see [`crate::text::sampler::TokenMask`].
    pub mask: Option<MaskHook>,
    /// Hand the raw logits of every token to the caller (parity checks; 4 bytes × vocab each).
    pub return_logits: bool,
}

impl GenerateRequest {
    /// A greedy request for `prompt` with default limits.
    pub fn new(prompt: PromptInput) -> Self {
        GenerateRequest {
            prompt,
            images: Vec::new(),
            audios: Vec::new(),
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            stop: Vec::new(),
            top_logprobs: 0,
            ignore_eos: false,
            max_crops: None,
            mask: None,
            return_logits: false,
        }
    }
}

/// A tokenised request ready for the decoder.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Input ids with every placeholder expanded.
    pub ids: Vec<u32>,
    pub mode: Mode,
    /// Preprocessed images, in placeholder order.
    pub images: Vec<PreparedImage>,
    /// The per-image crop cap that was applied.
    pub max_crops: usize,
    /// Log-mel features of each audio, in placeholder order.
    pub audios: Vec<LogMel>,
}

impl Prepared {
    /// Text-only input ids.
    pub fn text(ids: Vec<u32>) -> Self {
        Prepared { ids, mode: Mode::Text, images: Vec::new(), max_crops: 0, audios: Vec::new() }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One generated token as it is streamed.
#[derive(Debug)]
pub struct Step<'a> {
    pub id: u32,
    /// Newly completed text (may be empty while a character is incomplete).
    pub text: &'a str,
    pub logprob: f32,
    pub top: &'a [TokenLogprob],
    /// The raw logits that produced this token.
    pub logits: &'a [f32],
}

/// Per-token record in a completion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

/// Prefill and decode speed of one generation.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub decode_tokens: usize,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// The result of a generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenInfo>,
    pub finish_reason: FinishReason,
    pub mode: Mode,
    pub timings: Timings,
    /// Prompt positions whose KV came from the scheduler's prefix cache (OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
}


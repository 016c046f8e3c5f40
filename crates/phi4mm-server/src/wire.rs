//! OpenAI's request bodies, and the one place they are validated into the library's typed
//! requests. Unknown fields are tolerated (clients send many); a field of the wrong type or
//! out of range is a 400 naming it.

use std::collections::HashMap;

use phi4mm::{GenerateRequest, Message, Mode, PromptInput, SamplingParams};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::fetch::{base64_bytes, MediaRef};
use crate::tools::{with_past_calls, PastCall};

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub logprobs: Option<bool>,
    #[serde(flatten)]
    pub gen: GenParams,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: RawPrompt,
    #[serde(default)]
    pub echo: bool,
    /// The legacy API's number of alternatives per token (0–5).
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub gen: GenParams,
}

/// A legacy prompt: text or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPrompt {
    Text(String),
    Ids(Vec<u32>),
    Batch(Vec<String>),
}

/// The generation settings both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct GenParams {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub top_logprobs: Option<u32>,
    pub n: Option<u32>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<serde_json::Value>,
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's earlier tool calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<PastCall>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: UrlRef },
    InputAudio { input_audio: InputAudio },
    AudioUrl { audio_url: UrlRef },
}

#[derive(Debug, Deserialize)]
pub struct UrlRef {
    pub url: String,
}

#[derive(Debug, Deserialize)]
pub struct InputAudio {
    pub data: String,
    pub format: Option<String>,
}

/// A media reference and the request part it came from (`messages[i].content[j]`).
pub type Named = (MediaRef, String);

/// What the server allows per request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub images: usize,
    pub audios: usize,
    /// Most choices per request (`n`).
    pub n: usize,
    /// `max_tokens` when the client gives none (also capped by the context).
    pub default_max_tokens: usize,
}

/// Which adapter the request's `model` asks for: `None` lets the media choose.
pub fn model_mode(model: Option<&str>, served: &str) -> ApiResult<Option<Mode>> {
    match model {
        None => Ok(None),
        Some(m) if m == served || m == "phi4mm" || m.eq_ignore_ascii_case("microsoft/Phi-4-multimodal-instruct") => Ok(None),
        Some("vision") => Ok(Some(Mode::Vision)),
        Some("speech") => Ok(Some(Mode::Speech)),
        Some(m) => Err(ApiError::model_not_found(m, served)),
    }
}

/// The chat messages as the library's messages and media: each message's parts joined in
/// order with nothing between them, a media part standing where its `<|image_N|>` /
/// `<|audio_N|>` marker goes (N counted over the conversation), as the CLI writes them.
pub fn chat_prompt(messages: &[ChatMessage], limits: &Limits) -> ApiResult<(Vec<Message>, Vec<Named>, Vec<Named>)> {
    if messages.is_empty() {
        return Err(ApiError::bad_param("messages", "`messages` must hold at least one message"));
    }
    let (mut images, mut audios) = (Vec::new(), Vec::new());
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_param(format!("messages[{i}].role"), format!("unknown role `{}` (system, user, assistant, tool)", m.role)));
        }
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        let mut text = String::new();
        match &m.content {
            None => {}
            Some(Content::Text(t)) => text.push_str(t),
            Some(Content::Parts(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let at = format!("messages[{i}].content[{j}]");
                    match p {
                        Part::Text { text: t } => text.push_str(t),
                        Part::ImageUrl { image_url } => {
                            images.push((MediaRef::Url(image_url.url.clone()), at));
                            text.push_str(&format!("<|image_{}|>", images.len()));
                        }
                        Part::AudioUrl { audio_url } => {
                            audios.push((MediaRef::Url(audio_url.url.clone()), at));
                            text.push_str(&format!("<|audio_{}|>", audios.len()));
                        }
                        Part::InputAudio { input_audio } => {
                            let bytes = base64_bytes(&input_audio.data).map_err(|m| ApiError::bad_param(at.clone(), m))?;
                            audios.push((MediaRef::Inline(bytes), at));
                            text.push_str(&format!("<|audio_{}|>", audios.len()));
                        }
                    }
                }
            }
        }
        let text = with_past_calls(&text, m.tool_calls.as_deref().unwrap_or_default());
        out.push(Message::new(role, text));
    }
    if images.len() > limits.images || audios.len() > limits.audios {
        return Err(ApiError::bad_param(
            "messages",
            format!("{} images and {} audios in one request; this server allows at most {} and {} (--limit-mm-per-prompt)", images.len(), audios.len(), limits.images, limits.audios),
        ));
    }
    Ok((out, images, audios))
}

impl GenParams {
    /// The library request for `prompt`, with every setting checked (prompt + `max_tokens`
    /// against the context is checked once the prompt is tokenized).
    pub fn to_request(&self, prompt: PromptInput, limits: &Limits) -> ApiResult<GenerateRequest> {
        let mut r = GenerateRequest::new(prompt);
        let max = self.max_completion_tokens.or(self.max_tokens);
        r.max_new_tokens = match max {
            Some(0) => return Err(ApiError::bad_param("max_tokens", "`max_tokens` must be at least 1")),
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
            None => limits.default_max_tokens,
        };
        r.sampling = self.sampling()?;
        r.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() > 4 => return Err(ApiError::bad_param("stop", "at most 4 stop sequences")),
            Some(Stop::Many(v)) => v.clone(),
        };
        r.stop.retain(|s| !s.is_empty());
        r.top_logprobs = match self.top_logprobs {
            Some(k) if k > 20 => return Err(ApiError::bad_param("top_logprobs", "`top_logprobs` must be between 0 and 20")),
            Some(k) => k as usize,
            None => 0,
        };
        r.ignore_eos = self.ignore_eos;
        Ok(r)
    }

    /// How many choices (`n`, 1 by default, at most `limits.n`).
    pub fn choices(&self, limits: &Limits) -> ApiResult<usize> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::bad_param("n", "`n` must be at least 1")),
            n if n as usize > limits.n => Err(ApiError::bad_param("n", format!("`n` is at most {} on this server", limits.n))),
            n => Ok(n as usize),
        }
    }

    /// OpenAI's defaults where the client is silent (temperature 1, top-p 1; a fresh seed).
    fn sampling(&self) -> ApiResult<SamplingParams> {
        let range = |name: &str, v: Option<f32>, lo: f32, hi: f32, default: f32| -> ApiResult<f32> {
            let v = v.unwrap_or(default);
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(ApiError::bad_param(name, format!("`{name}` must be between {lo} and {hi}, got {v}")))
            }
        };
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            k => return Err(ApiError::bad_param("top_k", format!("`top_k` must be -1, 0 or positive, got {k}"))),
        };
        let mut logit_bias = Vec::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let id: u32 = k.parse().map_err(|_| ApiError::bad_param("logit_bias", format!("`logit_bias` keys are token ids, got `{k}`")))?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::bad_param("logit_bias", format!("`logit_bias` values are between -100 and 100, got {v}")));
            }
            logit_bias.push((id, v));
        }
        logit_bias.sort_by_key(|b| b.0);
        Ok(SamplingParams {
            temperature: range("temperature", self.temperature, 0.0, 2.0, 1.0)?,
            top_p: range("top_p", self.top_p, 0.0, 1.0, 1.0)?.max(f32::MIN_POSITIVE),
            top_k,
            min_p: range("min_p", self.min_p, 0.0, 1.0, 0.0)?,
            presence_penalty: range("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?,
            repetition_penalty: range("repetition_penalty", self.repetition_penalty, 0.01, 10.0, 1.0)?,
            logit_bias,
            seed: self.seed.unwrap_or_else(rand::random),
        })
    }
}

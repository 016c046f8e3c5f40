//! `POST /v1/audio/transcriptions` and `POST /v1/audio/translations` (OpenAI's multipart
//! form). Transcription uses the model card's prompt (`Transcribe the audio clip into text.`),
//! translation the official recipe's (`Translate the audio to {language}.`, English unless
//! `to_language` says otherwise); `prompt` replaces the instruction. The speech adapter runs.
//!
//! A recording is cut into pieces of one speech-encoder window (40 s) and every piece is its
//! own sequence, all submitted at once so they batch. Each piece is a segment: its `start` and
//! `end` are the piece's bounds in the recording (window times, not word alignments), which
//! is what `srt`, `vtt` and `verbose_json` carry. A recording of one window or less is a
//! single request identical to `phi4mm transcribe`.

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::State;
use axum::http::header;
use axum::response::sse::Event as Sse;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use phi4mm::audio::audio_io::AudioLimits;
use phi4mm::audio::split::{split_audio, WINDOW_SECONDS};
use phi4mm::{Completion, Event, GenerateRequest, MediaInput, Message, Mode, PromptInput};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::chat::wait;
use crate::error::{ApiError, ApiResult};
use crate::wire::{self, GenParams};
use crate::worker::Ticket;
use crate::{stream::sse_response, AppState, Ready};

/// Which of the two routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Transcribe,
    Translate,
}

/// The form's fields.
#[derive(Default)]
struct Form {
    file: Option<Vec<u8>>,
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    format: Option<String>,
    to_language: Option<String>,
    stream: bool,
    include_usage: bool,
    gen: GenParams,
}

pub async fn transcriptions(State(app): State<AppState>, form: Result<Multipart, MultipartRejection>) -> Response {
    speech(app, form, Task::Transcribe).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn translations(State(app): State<AppState>, form: Result<Multipart, MultipartRejection>) -> Response {
    speech(app, form, Task::Translate).await.unwrap_or_else(IntoResponse::into_response)
}

fn form_error(e: MultipartError) -> ApiError {
    ApiError::new(e.status(), "invalid_request_error", format!("invalid multipart form: {}", e.body_text()))
}

/// Reads the multipart fields (unknown ones are ignored, as in the JSON routes).
async fn read_form(mut m: Multipart) -> ApiResult<Form> {
    let mut f = Form::default();
    while let Some(field) = m.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or("").to_string();
        if name == "file" {
            f.file = Some(field.bytes().await.map_err(form_error)?.to_vec());
            continue;
        }
        let v = field.text().await.map_err(form_error)?;
        let num = |v: &str| v.trim().parse::<f32>().map_err(|_| ApiError::bad_param(name.clone(), format!("`{name}` must be a number, got `{v}`")));
        match name.as_str() {
            "model" => f.model = Some(v),
            "language" => f.language = Some(v),
            "prompt" => f.prompt = Some(v),
            "response_format" => f.format = Some(v),
            "to_language" => f.to_language = Some(v),
            "stream" => f.stream = v.trim() == "true",
            "stream_include_usage" => f.include_usage = v.trim() == "true",
            "temperature" => f.gen.temperature = Some(num(&v)?),
            "top_p" => f.gen.top_p = Some(num(&v)?),
            "seed" => f.gen.seed = Some(num(&v)? as u64),
            "max_completion_tokens" | "max_tokens" => f.gen.max_tokens = Some(num(&v)?.max(0.0) as u64),
            _ => {}
        }
    }
    Ok(f)
}

async fn speech(app: AppState, form: Result<Multipart, MultipartRejection>, task: Task) -> ApiResult<Response> {
    let ready = app.ready()?;
    let form = form.map_err(|r| ApiError::new(r.status(), "invalid_request_error", r.body_text()))?;
    let mut f = read_form(form).await?;
    if wire::model_mode(f.model.as_deref(), &app.config.served_model_name)? == Some(Mode::Vision) {
        return Err(ApiError::bad_param("model", "the vision adapter cannot transcribe audio; use the base model name or `speech`"));
    }
    let format = f.format.clone().unwrap_or_else(|| "json".into());
    if !matches!(format.as_str(), "json" | "text" | "srt" | "vtt" | "verbose_json") {
        return Err(ApiError::bad_param("response_format", format!("`response_format` is json, text, srt, vtt or verbose_json, got `{format}`")));
    }
    if f.stream && !matches!(format.as_str(), "json" | "text") {
        return Err(ApiError::bad_param("stream", format!("`stream` gives text deltas; it cannot be combined with `{format}`")));
    }
    let file = f.file.take().ok_or_else(|| ApiError::bad_param("file", "the form has no `file` field (the audio to transcribe)"))?;
    f.gen.temperature = Some(f.gen.temperature.unwrap_or(0.0));
    let (duration, pieces) = tokio::task::spawn_blocking(move || split_audio(file, WINDOW_SECONDS, &AudioLimits::default()))
        .await
        .map_err(|e| ApiError::internal(format!("reading the audio failed: {e}")))?
        .map_err(|e| ApiError::from(e).with_param("file"))?;
    let instruction = f.prompt.clone().unwrap_or_else(|| match task {
        Task::Transcribe => "Transcribe the audio clip into text.".into(),
        Task::Translate => format!("Translate the audio to {}.", f.to_language.as_deref().unwrap_or("English")),
    });
    let mut subs = Vec::with_capacity(pieces.len());
    for p in &pieces {
        let mut r = f.gen.to_request(PromptInput::Chat(vec![Message::new("user", format!("<|audio_1|>{instruction}"))]), &app.config.limits)?;
        r.audios = vec![MediaInput::Bytes(p.bytes.clone())];
        subs.push(submit_piece(&ready, r, f.gen.max_tokens.is_some()).await?);
    }
    let times: Vec<(f64, f64)> = pieces.iter().map(|p| (p.start, p.end)).collect();
    let out = Answer { task, duration, language: f.language.clone(), temperature: f.gen.temperature.unwrap_or(0.0), times };
    if f.stream {
        return Ok(out.stream(subs, f.include_usage));
    }
    let mut done = Vec::with_capacity(subs.len());
    for (mut ticket, mut rx, _) in subs {
        done.push(wait(&mut rx).await?);
        ticket.finish();
    }
    Ok(out.whole(&format, &done))
}

/// One piece prepared (on a blocking thread), checked against the context, and queued.
async fn submit_piece(ready: &Ready, mut r: GenerateRequest, max_given: bool) -> ApiResult<(Ticket, UnboundedReceiver<Event>, usize)> {
    let (engine, req) = (ready.engine.clone(), r.clone());
    let prepared = tokio::task::spawn_blocking(move || engine.prepare(&req))
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))?
        .map_err(|e| ApiError::from(e).with_param("file"))?;
    if !max_given {
        r.max_new_tokens = r.max_new_tokens.min(ready.engine.max_context().saturating_sub(prepared.ids.len())).max(1);
    }
    ready.engine.check_lengths(&prepared, &r).map_err(|e| ApiError::from(e).with_code("context_length_exceeded"))?;
    let n = prepared.ids.len();
    let (t, rx) = ready.worker.submit(r, prepared).await?;
    Ok((t, rx, n))
}

/// What the answer needs besides the text.
struct Answer {
    task: Task,
    duration: f64,
    language: Option<String>,
    temperature: f32,
    times: Vec<(f64, f64)>,
}

impl Answer {
    fn usage(&self) -> Value {
        json!({"type": "duration", "seconds": self.duration.ceil() as u64})
    }

    /// The whole answer in `format`.
    fn whole(&self, format: &str, done: &[Completion]) -> Response {
        let texts: Vec<String> = done.iter().map(|c| c.text.trim().to_string()).collect();
        let text = texts.iter().filter(|t| !t.is_empty()).cloned().collect::<Vec<_>>().join(" ");
        let plain = |body: String, mime: &'static str| ([(header::CONTENT_TYPE, mime)], body).into_response();
        match format {
            "text" => plain(format!("{text}\n"), "text/plain; charset=utf-8"),
            "srt" => plain(cues(&self.times, &texts, ','), "application/x-subrip; charset=utf-8"),
            "vtt" => plain(format!("WEBVTT\n\n{}", cues(&self.times, &texts, '.')), "text/vtt; charset=utf-8"),
            "verbose_json" => {
                let segments: Vec<Value> = done
                    .iter()
                    .zip(&self.times)
                    .enumerate()
                    .map(|(i, (c, &(start, end)))| {
                        let avg = if c.logprobs.is_empty() { 0.0 } else { c.logprobs.iter().map(|t| f64::from(t.logprob)).sum::<f64>() / c.logprobs.len() as f64 };
                        json!({"id": i, "seek": (start * 100.0).round() as u64, "start": start, "end": end, "text": c.text.trim(), "tokens": c.tokens,
                               "temperature": self.temperature, "avg_logprob": avg, "compression_ratio": null, "no_speech_prob": null})
                    })
                    .collect();
                let task = if self.task == Task::Transcribe { "transcribe" } else { "translate" };
                Json(json!({"task": task, "language": self.language, "duration": self.duration, "text": text, "segments": segments, "usage": self.usage()})).into_response()
            }
            _ => Json(json!({"text": text, "usage": self.usage()})).into_response(),
        }
    }

    /// The pieces' text as `transcription.chunk` deltas, piece after piece.
    fn stream(self, subs: Vec<(Ticket, UnboundedReceiver<Event>, usize)>, include_usage: bool) -> Response {
        let object = if self.task == Task::Transcribe { "transcription.chunk" } else { "translation.chunk" };
        let last = subs.len().saturating_sub(1);
        let pieces = stream::iter(subs.into_iter().enumerate()).flat_map(move |(i, (ticket, rx, prompt))| {
            stream::unfold((rx, Some(ticket), i > 0), move |(mut rx, mut ticket, mut sep)| async move {
                loop {
                    let e = rx.recv().await?;
                    let content = match e {
                        Event::Token { text, .. } if !text.is_empty() => text,
                        Event::Done { completion, .. } => {
                            if let Some(t) = ticket.as_mut() {
                                t.finish();
                            }
                            let usage = (i == last && include_usage).then_some((prompt, completion.tokens.len()));
                            return Some((Piece::End(i == last, usage), (rx, ticket.take(), false)));
                        }
                        Event::Failed { error, .. } => return Some((Piece::Error(ApiError::from(error).body()), (rx, ticket.take(), false))),
                        _ => continue,
                    };
                    let content = if std::mem::take(&mut sep) { format!(" {content}") } else { content };
                    return Some((Piece::Text(content), (rx, ticket, sep)));
                }
            })
        });
        let seconds = self.duration.ceil() as u64;
        let body = pieces.flat_map(move |p| {
            let chunk = |choices: Value, usage: Value| Sse::default().data(json!({"object": object, "choices": choices, "usage": usage}).to_string());
            let out: Vec<Sse> = match p {
                Piece::Text(t) => vec![chunk(json!([{"index": 0, "delta": {"content": t}, "finish_reason": null}]), Value::Null)],
                Piece::End(false, _) => Vec::new(),
                Piece::End(true, usage) => {
                    let mut v = vec![chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]), Value::Null)];
                    if let Some((p, c)) = usage {
                        v.push(chunk(json!([]), json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "seconds": seconds})));
                    }
                    v.push(Sse::default().data("[DONE]"));
                    v
                }
                Piece::Error(b) => vec![Sse::default().data(b.to_string())],
            };
            stream::iter(out.into_iter().map(Ok::<Sse, std::convert::Infallible>))
        });
        sse_response(body)
    }
}

enum Piece {
    Text(String),
    /// A piece's end: whether it is the last, and then (prompt, completion) tokens for usage.
    End(bool, Option<(usize, usize)>),
    Error(Value),
}

/// SubRip / WebVTT cues: one per piece with text, `sep` before the milliseconds.
fn cues(times: &[(f64, f64)], texts: &[String], sep: char) -> String {
    let stamp = |s: f64| {
        let ms = (s * 1000.0).round() as u64;
        format!("{:02}:{:02}:{:02}{sep}{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
    };
    let mut out = String::new();
    for (n, (&(a, b), t)) in times.iter().zip(texts).filter(|(_, t)| !t.is_empty()).enumerate() {
        out.push_str(&format!("{}\n{} --> {}\n{t}\n\n", n + 1, stamp(a), stamp(b)));
    }
    out
}

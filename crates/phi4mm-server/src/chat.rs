//! `POST /v1/chat/completions` and `POST /v1/completions`: the body validated into library
//! requests ([`crate::wire`]), the media decoded off the async threads, one scheduler request
//! per choice, then either one JSON answer or an SSE stream ([`crate::stream`]).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use phi4mm::engine::Prepared;
use phi4mm::text::sampler::MaskHook;
use phi4mm::{Completion, Event, GenerateRequest, Mode, PromptInput};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::{ApiError, ApiResult};
use crate::structured::{self, Constraint};
use crate::tools::{self, Tools};
use crate::wire::{self, ChatRequest, CompletionRequest, GenParams, RawPrompt};
use crate::worker::Ticket;
use crate::{stream, AppState, Ready};

/// Which endpoint a response is for (object names and the choice's shape differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

/// A request's choices, submitted.
pub struct Submitted {
    pub api: Api,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub logprobs: bool,
    pub prompt_tokens: usize,
    /// The prompt text, for `echo`.
    pub echo: Option<String>,
    /// The answer may hold tool calls to parse.
    pub tools: bool,
    /// The LoRA adapter that runs: `text` (none), `vision` or `speech` (sent as [`ADAPTER_HEADER`]).
    pub adapter: &'static str,
    pub choices: Vec<(Ticket, UnboundedReceiver<Event>)>,
}

/// The response header that names the adapter a chat or completion request ran with.
pub const ADAPTER_HEADER: &str = "x-phi4mm-adapter";

/// What a request asks beyond generating: tool calls to parse, a grammar, echo.
#[derive(Default)]
pub struct Extras {
    pub tools: bool,
    pub constraint: Option<Constraint>,
    pub echo: bool,
    pub logprobs: bool,
}

pub async fn chat_completions(State(app): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match chat(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

pub async fn completions(State(app): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    match legacy(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The body as JSON of type `T`; a body over the limit is 413, malformed JSON or a wrong type 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body.map_err(|r| ApiError::new(r.status(), "invalid_request_error", r.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

async fn chat(app: AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let ready = app.ready()?;
    let req: ChatRequest = parse(body)?;
    let force = wire::model_mode(req.model.as_deref(), &app.config.served_model_name)?;
    let (mut messages, images, audios) = wire::chat_prompt(&req.messages, &app.config.limits)?;
    let g = &req.gen;
    let tools = Tools::from_request(g.tools.as_ref(), g.tool_choice.as_ref(), g.parallel_tool_calls)?;
    if let Some(t) = &tools {
        t.attach(&mut messages);
    }
    let extras = Extras { tools: tools.is_some(), constraint: structured::constraint(g.response_format.as_ref(), tools.as_ref())?, echo: false, logprobs: req.logprobs.unwrap_or(false) };
    let mut lib = req.gen.to_request(PromptInput::Chat(messages), &app.config.limits)?;
    if !extras.logprobs {
        lib.top_logprobs = 0;
    }
    lib.images = app.fetcher.resolve(images).await?;
    lib.audios = app.fetcher.resolve(audios).await?;
    let sub = submit(&app, &ready, Api::Chat, lib, &req.gen, force, extras).await?;
    respond(&ready, sub, &req.gen).await
}

async fn legacy(app: AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let ready = app.ready()?;
    let req: CompletionRequest = parse(body)?;
    let force = wire::model_mode(req.model.as_deref(), &app.config.served_model_name)?;
    let text = match &req.prompt {
        RawPrompt::Text(t) => t.clone(),
        RawPrompt::Ids(ids) => ready.engine.tokenizer().decode(ids, false)?,
        RawPrompt::Batch(v) if v.len() == 1 => v[0].clone(),
        RawPrompt::Batch(_) => return Err(ApiError::bad_param("prompt", "one prompt per request on this server")),
    };
    let mut lib = req.gen.to_request(PromptInput::Raw(text), &app.config.limits)?;
    lib.top_logprobs = match req.logprobs {
        Some(k) if k > 5 => return Err(ApiError::bad_param("logprobs", "`logprobs` must be between 0 and 5")),
        Some(k) => k as usize,
        None => 0,
    };
    let extras = Extras { tools: false, constraint: structured::constraint(req.gen.response_format.as_ref(), None)?, echo: req.echo, logprobs: req.logprobs.is_some() };
    let sub = submit(&app, &ready, Api::Completions, lib, &req.gen, force, extras).await?;
    respond(&ready, sub, &req.gen).await
}

/// Prepares the request (media decoded and grammars built on a blocking thread) and submits
/// one sequence per choice.
async fn submit(app: &AppState, ready: &Ready, api: Api, mut lib: GenerateRequest, gen: &GenParams, force: Option<Mode>, extras: Extras) -> ApiResult<Submitted> {
    let n = gen.choices(&app.config.limits)?;
    let (r, req, constraint) = (ready.clone(), lib.clone(), extras.constraint.clone());
    let (mut prepared, mut masks) =
        tokio::task::spawn_blocking(move || prepare(&r, &req, constraint.as_ref(), n)).await.map_err(|e| ApiError::internal(format!("preparing the request failed: {e}")))??;
    if let Some(mode) = force {
        force_mode(&mut prepared, mode)?;
    }
    let context = ready.engine.max_context();
    let prompt_tokens = prepared.ids.len();
    if gen.max_tokens.is_none() && gen.max_completion_tokens.is_none() {
        lib.max_new_tokens = lib.max_new_tokens.min(context.saturating_sub(prompt_tokens)).max(1);
    }
    ready.engine.check_lengths(&prepared, &lib).map_err(|e| ApiError::from(e).with_code("context_length_exceeded"))?;
    let echo = if extras.echo { Some(ready.engine.tokenizer().decode(&prepared.ids, false)?) } else { None };
    let mut choices = Vec::with_capacity(n);
    for i in 0..n {
        let mut r = lib.clone();
        r.sampling.seed = r.sampling.seed.wrapping_add(i as u64);
        r.mask = masks.get_mut(i).and_then(Option::take);
        choices.push(ready.worker.submit(r, prepared.clone()).await?);
    }
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    Ok(Submitted {
        api,
        id: format!("{prefix}-{:032x}", rand::random::<u128>()),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: app.config.served_model_name.clone(),
        logprobs: extras.logprobs,
        prompt_tokens,
        echo,
        tools: extras.tools,
        adapter: adapter_name(prepared.mode),
        choices,
    })
}

/// The request prepared, and one grammar mask per choice when it is constrained.
fn prepare(ready: &Ready, req: &GenerateRequest, c: Option<&Constraint>, n: usize) -> ApiResult<(Prepared, Vec<Option<MaskHook>>)> {
    let prepared = ready.engine.prepare(req)?;
    let masks = match c {
        None => Vec::new(),
        Some(c) => {
            let g = ready.grammars.get(ready)?;
            (0..n).map(|_| structured::mask(&g, c).map(Some)).collect::<ApiResult<_>>()?
        }
    };
    Ok((prepared, masks))
}

/// Applies the adapter a `model` of `vision` / `speech` names (the media must allow it).
fn force_mode(p: &mut Prepared, mode: Mode) -> ApiResult<()> {
    let clash = match mode {
        Mode::Vision => !p.audios.is_empty(),
        Mode::Speech => !p.images.is_empty(),
        _ => false,
    };
    if clash {
        return Err(ApiError::bad_param("model", format!("model `{}` cannot take this request's media; use the base model name and the media choose the adapter", mode_name(mode))));
    }
    p.mode = mode;
    Ok(())
}

/// The adapter a prepared request's mode runs (an image and audio together use vision's).
fn adapter_name(m: Mode) -> &'static str {
    match m {
        Mode::Text => "text",
        Mode::Vision | Mode::VisionSpeech => "vision",
        Mode::Speech => "speech",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Vision => "vision",
        Mode::Speech => "speech",
        _ => "base",
    }
}

async fn respond(ready: &Ready, sub: Submitted, gen: &GenParams) -> ApiResult<Response> {
    let adapter = HeaderValue::from_static(sub.adapter);
    let mut r = if gen.stream {
        let usage = gen.stream_options.as_ref().is_some_and(|o| o.include_usage);
        stream::sse(ready.clone(), sub, usage).into_response()
    } else {
        answer(ready, sub).await?
    };
    r.headers_mut().insert(ADAPTER_HEADER, adapter);
    Ok(r)
}

/// The whole answer as one JSON body, once every choice has finished.
async fn answer(ready: &Ready, sub: Submitted) -> ApiResult<Response> {
    let Submitted { api, id, created, model, logprobs, prompt_tokens, echo, tools, choices, .. } = sub;
    let mut out = Vec::with_capacity(choices.len());
    let (mut completion_tokens, mut cached) = (0, usize::MAX);
    for (index, (mut ticket, mut rx)) in choices.into_iter().enumerate() {
        let c = wait(&mut rx).await?;
        ticket.finish();
        completion_tokens += c.tokens.len();
        cached = cached.min(c.cached_tokens);
        out.push(choice(ready, api, index, &c, logprobs, echo.as_deref(), tools));
    }
    let object = if api == Api::Chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }))
    .into_response())
}

/// The request's end: its completion, or its error.
pub(crate) async fn wait(rx: &mut UnboundedReceiver<Event>) -> ApiResult<Completion> {
    while let Some(e) = rx.recv().await {
        match e {
            Event::Done { completion, .. } | Event::Cancelled { completion: Some(completion), .. } => return Ok(completion),
            Event::Failed { error, .. } => return Err(error.into()),
            Event::Cancelled { completion: None, .. } => break,
            _ => {}
        }
    }
    Err(ApiError::internal("the request ended without a result"))
}

/// OpenAI's `usage` object.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": if cached == usize::MAX { 0 } else { cached }},
    })
}

fn choice(ready: &Ready, api: Api, index: usize, c: &Completion, logprobs: bool, echo: Option<&str>, tools: bool) -> Value {
    let finish = match c.finish_reason {
        phi4mm::engine::FinishReason::Stop => "stop",
        phi4mm::engine::FinishReason::Length => "length",
    };
    let lp = logprobs.then(|| stream::logprobs(ready, api, &c.logprobs));
    let calls = if tools { tools::parse_calls(&c.text) } else { None };
    match (api, calls) {
        (Api::Chat, Some((content, calls))) => json!({
            "index": index,
            "message": {"role": "assistant", "content": if content.is_empty() { Value::Null } else { json!(content) }, "tool_calls": tools::openai_calls(&calls)},
            "logprobs": lp,
            "finish_reason": "tool_calls",
        }),
        (Api::Chat, None) => json!({
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": lp,
            "finish_reason": finish,
        }),
        (Api::Completions, _) => json!({
            "index": index,
            "text": format!("{}{}", echo.unwrap_or(""), c.text),
            "logprobs": lp,
            "finish_reason": finish,
        }),
    }
}

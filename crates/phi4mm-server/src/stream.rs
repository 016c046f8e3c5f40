//! Streamed answers as OpenAI's server-sent events: one `chat.completion.chunk` (or
//! `text_completion`) per text piece with the same `id` and `created`, the role in the first
//! delta, `finish_reason` in each choice's last chunk, with `stream_options.include_usage` a
//! final chunk with `choices: []` and the totals, then `data: [DONE]`. An error midway is sent
//! as `data: {"error": …}` (what the `openai` SDK raises). The stream owns the requests'
//! tickets: a client that goes away drops it, which cancels them.
//!
//! Also OpenAI's logprob objects, for streamed and whole answers alike.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use phi4mm::engine::{FinishReason, TokenInfo};
use phi4mm::{Completion, Event};
use serde_json::{json, Value};

use crate::chat::{usage, Api, Submitted};
use crate::error::ApiError;
use crate::tools::{self, CALL_OPEN};
use crate::worker::Ticket;
use crate::Ready;

/// What the stream has sent for one choice.
#[derive(Default)]
struct ChoiceState {
    /// The text received so far.
    text: String,
    /// How much of it went out as content.
    sent: usize,
    /// A `<|tool_call|>` block has begun: the rest is held for the calls.
    in_call: bool,
    tokens: usize,
    cached: usize,
    ended: bool,
}

impl ChoiceState {
    /// Takes `piece` in and gives the content that may go out now: everything, or with tools
    /// everything before a (possibly partial) `<|tool_call|>`.
    fn take(&mut self, piece: &str, tools: bool) -> String {
        if !tools {
            // Nothing is held: the text need not be kept.
            self.sent += piece.len();
            return piece.to_string();
        }
        let base = self.sent;
        self.text.push_str(piece);
        let upto = if self.in_call {
            self.sent
        } else if let Some(p) = self.text[base..].find(CALL_OPEN) {
            // Only the unsent tail can hold the tag's start (the rest went out as content).
            self.in_call = true;
            base + p
        } else {
            let held = (1..CALL_OPEN.len()).rev().find(|&k| self.text.ends_with(&CALL_OPEN[..k])).unwrap_or(0);
            self.text.len() - held
        };
        let out = self.text.get(self.sent..upto).unwrap_or("").to_string();
        self.sent = self.sent.max(upto);
        out
    }
}

/// Turns each choice's events into chunks.
struct Chunker {
    ready: Ready,
    api: Api,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    prompt_tokens: usize,
    include_usage: bool,
    tools: bool,
    states: Vec<ChoiceState>,
    tickets: Vec<Option<Ticket>>,
}

impl Chunker {
    fn chunk(&self, choices: Value, usage_v: Value) -> Sse {
        let object = if self.api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        let body = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices, "usage": usage_v});
        Sse::default().data(body.to_string())
    }

    /// The first chunks: the role of every chat choice, or the echoed prompt.
    fn head(&self, echo: Option<&str>) -> Vec<Sse> {
        let n = self.states.len();
        match (self.api, echo) {
            (Api::Chat, _) => (0..n).map(|i| self.chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), Value::Null)).collect(),
            (Api::Completions, Some(e)) => (0..n).map(|i| self.chunk(json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}]), Value::Null)).collect(),
            (Api::Completions, None) => Vec::new(),
        }
    }

    /// The chunks for event `e` of choice `i` (after the last choice's end: usage and `[DONE]`).
    fn on(&mut self, i: usize, e: Event) -> Vec<Sse> {
        let mut out = Vec::new();
        match e {
            Event::Token { token, text, .. } => {
                self.states[i].tokens += 1;
                let content = self.states[i].take(&text, self.tools);
                if !content.is_empty() || self.logprobs {
                    let lp = self.logprobs.then(|| logprobs(&self.ready, self.api, std::slice::from_ref(&token)));
                    out.push(self.chunk(json!([piece(self.api, i, &content, lp, None)]), Value::Null));
                }
            }
            Event::Done { completion: c, .. } | Event::Cancelled { completion: Some(c), .. } => {
                out.extend(self.ending(i, &c));
                let s = &mut self.states[i];
                (s.tokens, s.cached, s.ended) = (c.tokens.len(), c.cached_tokens, true);
                if let Some(mut t) = self.tickets[i].take() {
                    t.finish();
                }
            }
            Event::Failed { error, .. } => {
                self.states[i].ended = true;
                out.push(Sse::default().data(ApiError::from(error).body().to_string()));
            }
            Event::Cancelled { completion: None, .. } => self.states[i].ended = true,
            Event::Progress { .. } => {}
        }
        if self.states.iter().all(|s| s.ended) && !out.is_empty() {
            if self.include_usage {
                let completion: usize = self.states.iter().map(|s| s.tokens).sum();
                let cached = self.states.iter().map(|s| s.cached).min().unwrap_or(0);
                out.push(self.chunk(json!([]), usage(self.prompt_tokens, completion, cached)));
            }
            out.push(Sse::default().data("[DONE]"));
        }
        out
    }
}

impl Chunker {
    /// A choice's last chunks: content held back (the start of a stop string that never
    /// came), the tool calls (each one's `id`, `type` and `name` once, then its `arguments`
    /// in pieces), and the finish reason.
    fn ending(&self, i: usize, c: &Completion) -> Vec<Sse> {
        let sent = self.states[i].sent;
        let calls = if self.tools { tools::parse_calls(&c.text) } else { None };
        let Some((content, calls)) = calls else {
            let tail = c.text.get(sent..).unwrap_or("");
            let finish = if c.finish_reason == FinishReason::Stop { "stop" } else { "length" };
            return vec![self.chunk(json!([piece(self.api, i, tail, None, Some(finish))]), Value::Null)];
        };
        let mut out = Vec::new();
        if let Some(rest) = content.get(sent..).filter(|r| !r.is_empty()) {
            out.push(self.chunk(json!([piece(self.api, i, rest, None, None)]), Value::Null));
        }
        let delta = |d: Value| self.chunk(json!([{"index": i, "delta": {"tool_calls": [d]}, "logprobs": null, "finish_reason": null}]), Value::Null);
        for (k, call) in calls.iter().enumerate() {
            out.push(delta(json!({"index": k, "id": tools::call_id(), "type": "function", "function": {"name": call.name, "arguments": ""}})));
            for frag in fragments(&call.arguments, 24) {
                out.push(delta(json!({"index": k, "function": {"arguments": frag}})));
            }
        }
        out.push(self.chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}]), Value::Null));
        out
    }
}

/// `s` in pieces of about `n` bytes, split at character boundaries.
fn fragments(s: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + n).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        out.push(&s[start..end]);
        start = end;
    }
    out
}

pub fn sse(ready: Ready, sub: Submitted, include_usage: bool) -> Response {
    let Submitted { api, id, created, model, logprobs, prompt_tokens, echo, tools, choices, .. } = sub;
    let n = choices.len();
    let (tickets, receivers): (Vec<_>, Vec<_>) = choices.into_iter().unzip();
    let tagged = receivers.into_iter().enumerate().map(|(i, rx)| stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }).boxed());
    let mut chunker = Chunker {
        ready,
        api,
        id,
        created,
        model,
        logprobs,
        prompt_tokens,
        include_usage,
        tools,
        states: (0..n).map(|_| ChoiceState::default()).collect(),
        tickets: tickets.into_iter().map(Some).collect(),
    };
    let head = chunker.head(echo.as_deref());
    let body = stream::select_all(tagged).map(move |(i, e)| stream::iter(chunker.on(i, e).into_iter().map(Ok::<Sse, Infallible>))).flatten();
    sse_response(stream::iter(head.into_iter().map(Ok::<Sse, Infallible>)).chain(body))
}

pub fn sse_response(s: impl Stream<Item = Result<Sse, Infallible>> + Send + 'static) -> Response {
    axum::response::Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))).into_response()
}

/// One streamed choice: a delta (chat) or a text piece (completions).
fn piece(api: Api, index: usize, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
    match api {
        Api::Chat => {
            let delta = if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
        Api::Completions => {
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    }
}

/// OpenAI's logprobs object for `tokens`: chat's `{content: [{token, logprob, bytes,
/// top_logprobs}]}` or the legacy `{tokens, token_logprobs, top_logprobs, text_offset}`.
pub fn logprobs(ready: &Ready, api: Api, tokens: &[TokenInfo]) -> Value {
    let tok = ready.engine.tokenizer();
    let bytes = |id: u32| tok.token_bytes(id).unwrap_or_default();
    let text = |id: u32| String::from_utf8_lossy(&bytes(id)).into_owned();
    match api {
        Api::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t.top.iter().map(|a| json!({"token": text(a.id), "logprob": a.logprob, "bytes": bytes(a.id)})).collect();
                    json!({"token": text(t.id), "logprob": t.logprob, "bytes": bytes(t.id), "top_logprobs": top})
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Api::Completions => {
            let mut offset = 0;
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(offset);
                offset += text(t.id).len();
            }
            json!({
                "tokens": tokens.iter().map(|t| text(t.id)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|a| (text(a.id), json!(a.logprob))).collect::<serde_json::Map<String, Value>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

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
use phi4mm::Event;
use serde_json::{json, Value};

use crate::chat::{usage, Api, Submitted};
use crate::error::ApiError;
use crate::worker::Ticket;
use crate::Ready;

/// What the stream has sent for one choice.
#[derive(Default)]
struct ChoiceState {
    text_len: usize,
    tokens: usize,
    cached: usize,
    ended: bool,
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
                if !text.is_empty() || self.logprobs {
                    self.states[i].text_len += text.len();
                    let lp = self.logprobs.then(|| logprobs(&self.ready, self.api, std::slice::from_ref(&token)));
                    out.push(self.chunk(json!([piece(self.api, i, &text, lp, None)]), Value::Null));
                }
            }
            Event::Done { completion: c, .. } | Event::Cancelled { completion: Some(c), .. } => {
                // Text held back until the end (the start of a stop string that never came).
                let tail = c.text.get(self.states[i].text_len..).unwrap_or("").to_string();
                let finish = if c.finish_reason == FinishReason::Stop { "stop" } else { "length" };
                out.push(self.chunk(json!([piece(self.api, i, &tail, None, Some(finish))]), Value::Null));
                self.states[i] = ChoiceState { text_len: c.text.len(), tokens: c.tokens.len(), cached: c.cached_tokens, ended: true };
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

pub fn sse(ready: Ready, sub: Submitted, include_usage: bool) -> Response {
    let Submitted { api, id, created, model, logprobs, prompt_tokens, echo, choices } = sub;
    let n = choices.len();
    let (tickets, receivers): (Vec<_>, Vec<_>) = choices.into_iter().unzip();
    let tagged = receivers.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }).boxed()
    });
    let mut chunker = Chunker {
        ready,
        api,
        id,
        created,
        model,
        logprobs,
        prompt_tokens,
        include_usage,
        states: (0..n).map(|_| ChoiceState::default()).collect(),
        tickets: tickets.into_iter().map(Some).collect(),
    };
    let head = chunker.head(echo.as_deref());
    let body = stream::select_all(tagged).map(move |(i, e)| stream::iter(chunker.on(i, e).into_iter().map(Ok::<Sse, Infallible>))).flatten();
    sse_response(stream::iter(head.into_iter().map(Ok::<Sse, Infallible>)).chain(body))
}

fn sse_response(s: impl Stream<Item = Result<Sse, Infallible>> + Send + 'static) -> Response {
    axum::response::Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))).into_response()
}

/// One streamed choice: a delta (chat) or a text piece (completions).
fn piece(api: Api, index: usize, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
    match api {
        Api::Chat => {
            let delta = if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
        Api::Completions => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}),
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

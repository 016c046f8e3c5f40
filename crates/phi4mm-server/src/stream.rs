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
use crate::Ready;

/// What the stream has sent for one choice.
#[derive(Default)]
struct ChoiceState {
    text_len: usize,
    tokens: usize,
    cached: usize,
    ended: bool,
}

pub fn sse(ready: Ready, sub: Submitted, include_usage: bool) -> Response {
    let Submitted { api, id, created, model, logprobs, prompt_tokens, echo, choices } = sub;
    let n = choices.len();
    let (tickets, receivers): (Vec<_>, Vec<_>) = choices.into_iter().unzip();
    let tagged = receivers.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }).boxed()
    });
    let merged = stream::select_all(tagged);
    let chunk = move |choices: Value, usage_v: Value| -> Sse {
        let object = if api == Api::Chat { "chat.completion.chunk" } else { "text_completion" };
        let body = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices, "usage": usage_v});
        Sse::default().data(body.to_string())
    };
    let mut states: Vec<ChoiceState> = (0..n).map(|_| ChoiceState::default()).collect();
    let mut tickets: Vec<_> = tickets.into_iter().map(Some).collect();
    let head: Vec<Sse> = match api {
        Api::Chat => (0..n).map(|i| chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), Value::Null)).collect(),
        Api::Completions => echo.iter().flat_map(|e| (0..n).map(move |i| (i, e.clone()))).map(|(i, e)| chunk(json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}]), Value::Null)).collect(),
    };
    let body = merged
        .map(move |(i, e)| {
            let mut out = Vec::new();
            match e {
                Event::Token { token, text, .. } => {
                    states[i].tokens += 1;
                    if !text.is_empty() || logprobs {
                        states[i].text_len += text.len();
                        let lp = logprobs.then(|| logprobs_json(&ready, api, std::slice::from_ref(&token)));
                        out.push(chunk(json!([piece(api, i, &text, lp, None)]), Value::Null));
                    }
                }
                Event::Done { completion: c, .. } | Event::Cancelled { completion: Some(c), .. } => {
                    // Text held back at the end (a partial stop string that never completed).
                    let tail = c.text.get(states[i].text_len..).unwrap_or("").to_string();
                    let finish = if c.finish_reason == FinishReason::Stop { "stop" } else { "length" };
                    out.push(chunk(json!([piece(api, i, &tail, None, Some(finish))]), Value::Null));
                    states[i].cached = c.cached_tokens;
                    states[i].tokens = c.tokens.len();
                    states[i].ended = true;
                    if let Some(mut t) = tickets[i].take() {
                        t.finish();
                    }
                }
                Event::Failed { error, .. } => {
                    states[i].ended = true;
                    out.push(Sse::default().data(ApiError::from(error).body().to_string()));
                }
                Event::Cancelled { completion: None, .. } => states[i].ended = true,
                Event::Progress { .. } => {}
            }
            if states.iter().all(|s| s.ended) && !out.is_empty() {
                if include_usage {
                    let completion: usize = states.iter().map(|s| s.tokens).sum();
                    let cached = states.iter().map(|s| s.cached).min().unwrap_or(0);
                    out.push(chunk(json!([]), usage(prompt_tokens, completion, cached)));
                }
                out.push(Sse::default().data("[DONE]"));
            }
            stream::iter(out.into_iter().map(Ok::<Sse, Infallible>))
        })
        .flatten();
    let all = stream::iter(head.into_iter().map(Ok::<Sse, Infallible>)).chain(body);
    sse_response(all)
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
    logprobs_json(ready, api, tokens)
}

fn logprobs_json(ready: &Ready, api: Api, tokens: &[TokenInfo]) -> Value {
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

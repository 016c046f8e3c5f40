//! Bad requests, each with its status and an OpenAI error body `{error: {message, type, param,
//! code}}` whose message names the problem; a full queue is 503 with `Retry-After`; a client
//! that hangs up mid-stream is cancelled (its sequence leaves the scheduler) over a real socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is the report

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use phi4mm_server::{router, AppState, ServerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

mod common;
use common::{engine, fixtures};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn user(content: Value) -> Value {
    json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4})
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

async fn send(app: &axum::Router, path: &str, body: Body) -> (StatusCode, Value, axum::http::HeaderMap) {
    let req = Request::builder().method("POST").uri(path).header("content-type", "application/json").body(body).expect("a request");
    let resp = app.clone().oneshot(req).await.expect("an answer");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("a body").to_bytes();
    (parts.status, serde_json::from_slice(&bytes).unwrap_or(json!({"raw": String::from_utf8_lossy(&bytes)})), parts.headers)
}

/// (case, path, body, status, a word the message must hold, the param if any)
type Case = (&'static str, &'static str, Body, u16, &'static str, Option<&'static str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_an_openai_error_body() {
    let engine = engine();
    let config = ServerConfig { max_body_bytes: 1 << 20, ..ServerConfig::default() };
    let opts = common::sched(4, 8);
    let app = router(AppState::new(config, engine, opts).expect("started"));
    let ok = user(json!("Hi"));
    let img = |url: String| user(json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]));
    let png = std::fs::read(fixtures().join("images/tiny_20x20.png")).expect("a fixture");
    let trunc = png[..png.len() / 2].to_vec();
    let wav = std::fs::read(fixtures().join("audio/speech_1s_16k.wav")).expect("a fixture");
    let audio = |data: String| user(json!([{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, {"type": "text", "text": "Transcribe."}]));
    let many_images = user(json!((0..9).map(|_| json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&png))}})).collect::<Vec<_>>()));
    // (case, path, body, status, a word the message must hold, the param if any)
    let chat = "/v1/chat/completions";
    let cases: Vec<Case> = vec![
        ("not JSON", chat, Body::from("{nope"), 400, "invalid request body", None),
        ("empty body", chat, Body::empty(), 400, "invalid request body", None),
        ("no messages field", chat, Body::from(json!({"model": "x"}).to_string()), 400, "messages", None),
        ("messages not a list", chat, Body::from(json!({"messages": "hi"}).to_string()), 400, "invalid request body", None),
        ("empty messages", chat, Body::from(json!({"messages": []}).to_string()), 400, "at least one", Some("messages")),
        ("unknown role", chat, Body::from(json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string()), 400, "wizard", Some("messages[0].role")),
        ("content a number", chat, Body::from(json!({"messages": [{"role": "user", "content": 5}]}).to_string()), 400, "invalid request body", None),
        ("unknown part type", chat, Body::from(user(json!([{"type": "video", "video": {}}])).to_string()), 400, "invalid request body", None),
        ("unknown model", chat, Body::from(with(ok.clone(), "model", json!("gpt-9")).to_string()), 404, "gpt-9", Some("model")),
        ("temperature too high", chat, Body::from(with(ok.clone(), "temperature", json!(3.5)).to_string()), 400, "temperature", Some("temperature")),
        ("temperature negative", chat, Body::from(with(ok.clone(), "temperature", json!(-1)).to_string()), 400, "temperature", Some("temperature")),
        ("temperature a string", chat, Body::from(with(ok.clone(), "temperature", json!("hot")).to_string()), 400, "invalid request body", None),
        ("top_p over 1", chat, Body::from(with(ok.clone(), "top_p", json!(1.5)).to_string()), 400, "top_p", Some("top_p")),
        ("top_k -2", chat, Body::from(with(ok.clone(), "top_k", json!(-2)).to_string()), 400, "top_k", Some("top_k")),
        ("min_p over 1", chat, Body::from(with(ok.clone(), "min_p", json!(2)).to_string()), 400, "min_p", Some("min_p")),
        ("presence_penalty 3", chat, Body::from(with(ok.clone(), "presence_penalty", json!(3)).to_string()), 400, "presence_penalty", Some("presence_penalty")),
        ("frequency_penalty -3", chat, Body::from(with(ok.clone(), "frequency_penalty", json!(-3)).to_string()), 400, "frequency_penalty", Some("frequency_penalty")),
        ("repetition_penalty 0", chat, Body::from(with(ok.clone(), "repetition_penalty", json!(0)).to_string()), 400, "repetition_penalty", Some("repetition_penalty")),
        ("top_logprobs 21", chat, Body::from(with(with(ok.clone(), "logprobs", json!(true)), "top_logprobs", json!(21)).to_string()), 400, "top_logprobs", Some("top_logprobs")),
        ("n 0", chat, Body::from(with(ok.clone(), "n", json!(0)).to_string()), 400, "`n`", Some("n")),
        ("n 99", chat, Body::from(with(ok.clone(), "n", json!(99)).to_string()), 400, "at most", Some("n")),
        ("max_tokens 0", chat, Body::from(with(ok.clone(), "max_tokens", json!(0)).to_string()), 400, "max_tokens", Some("max_tokens")),
        ("max_tokens negative", chat, Body::from(with(ok.clone(), "max_tokens", json!(-5)).to_string()), 400, "invalid request body", None),
        ("over the context", chat, Body::from(with(ok.clone(), "max_tokens", json!(10_000_000)).to_string()), 400, "context", None),
        ("five stop strings", chat, Body::from(with(ok.clone(), "stop", json!(["a", "b", "c", "d", "e"])).to_string()), 400, "stop", Some("stop")),
        ("stop a number", chat, Body::from(with(ok.clone(), "stop", json!(5)).to_string()), 400, "invalid request body", None),
        ("logit_bias key not an id", chat, Body::from(with(ok.clone(), "logit_bias", json!({"abc": 1})).to_string()), 400, "logit_bias", Some("logit_bias")),
        ("logit_bias value 500", chat, Body::from(with(ok.clone(), "logit_bias", json!({"12": 500})).to_string()), 400, "logit_bias", Some("logit_bias")),
        (
            "tool_choice names no tool",
            chat,
            Body::from(with(with(ok.clone(), "tools", json!([{"type": "function", "function": {"name": "f"}}])), "tool_choice", json!({"type": "function", "function": {"name": "g"}})).to_string()),
            400,
            "`g`",
            Some("tool_choice"),
        ),
        ("tools not function tools", chat, Body::from(with(ok.clone(), "tools", json!([{"type": "retrieval"}])).to_string()), 400, "function", Some("tools")),
        (
            "json_schema not a schema",
            chat,
            Body::from(with(ok.clone(), "response_format", json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}})).to_string()),
            400,
            "schema",
            Some("response_format"),
        ),
        ("response_format type unknown", chat, Body::from(with(ok.clone(), "response_format", json!({"type": "yaml"})).to_string()), 400, "yaml", Some("response_format.type")),
        ("image: not base64", chat, Body::from(img("data:image/png;base64,@@@".into()).to_string()), 400, "base64", Some("messages[0].content[0]")),
        ("image: data URI without base64", chat, Body::from(img("data:image/png,abc".into()).to_string()), 400, "base64", Some("messages[0].content[0]")),
        ("image: malformed data URI", chat, Body::from(img("data:image/png;base64".into()).to_string()), 400, "malformed", Some("messages[0].content[0]")),
        ("image: loopback URL", chat, Body::from(img("http://127.0.0.1/cat.png".into()).to_string()), 400, "loopback", Some("messages[0].content[0]")),
        ("image: metadata-service URL", chat, Body::from(img("http://169.254.169.254/latest".into()).to_string()), 400, "link-local", Some("messages[0].content[0]")),
        ("image: ftp URL", chat, Body::from(img("ftp://example.com/cat.png".into()).to_string()), 400, "not fetched", Some("messages[0].content[0]")),
        ("image: file URL", chat, Body::from(img("file:///etc/passwd".into()).to_string()), 400, "allowed-local-media-path", Some("messages[0].content[0]")),
        ("image: local path", chat, Body::from(img("/etc/passwd".into()).to_string()), 400, "allowed-local-media-path", Some("messages[0].content[0]")),
        ("image: junk bytes", chat, Body::from(img(format!("data:image/png;base64,{}", b64(b"not an image at all"))).to_string()), 400, "image", None),
        ("image: truncated PNG", chat, Body::from(img(format!("data:image/png;base64,{}", b64(&trunc))).to_string()), 400, "image", None),
        ("audio: junk bytes", chat, Body::from(audio(b64(b"RIFF....WAVEjunk")).to_string()), 400, "audio", None),
        ("audio: truncated WAV", chat, Body::from(audio(b64(&wav[..40])).to_string()), 400, "audio", None),
        ("too many images", chat, Body::from(many_images.to_string()), 400, "at most", Some("messages")),
        ("speech adapter with an image", chat, Body::from(with(img(format!("data:image/png;base64,{}", b64(&png))), "model", json!("speech")).to_string()), 400, "speech", Some("model")),
        ("body too large", chat, Body::from(vec![b' '; 2 << 20]), 413, "", None),
        ("completions: no prompt", "/v1/completions", Body::from(json!({"max_tokens": 2}).to_string()), 400, "prompt", None),
        ("completions: logprobs 6", "/v1/completions", Body::from(json!({"prompt": "a", "logprobs": 6}).to_string()), 400, "logprobs", Some("logprobs")),
        ("completions: two prompts", "/v1/completions", Body::from(json!({"prompt": ["a", "b"]}).to_string()), 400, "one prompt", Some("prompt")),
        ("tokenize: neither field", "/tokenize", Body::from(json!({}).to_string()), 400, "exactly one", None),
        ("detokenize: id outside the vocabulary", "/detokenize", Body::from(json!({"tokens": [999_999_999u32]}).to_string()), 400, "vocabulary", Some("tokens")),
        ("no such route", "/v1/nothing", Body::from("{}"), 404, "route", None),
    ];
    assert!(cases.len() >= 40);
    for (name, path, body, status, word, param) in cases {
        let (s, v, _) = send(&app, path, body).await;
        assert_eq!(s.as_u16(), status, "{name}: {v}");
        let e = &v["error"];
        assert!(e.is_object(), "{name}: an OpenAI error body: {v}");
        let msg = e["message"].as_str().unwrap_or("");
        assert!(msg.contains(word), "{name}: `{msg}` should name `{word}`");
        assert!(e["type"].is_string(), "{name}: {v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{name}: every field present: {v}");
        if let Some(p) = param {
            assert_eq!(e["param"], json!(p), "{name}");
        }
    }
    // Unknown fields are tolerated.
    let (s, v, _) = send(&app, chat, Body::from(with(ok, "frobnicate", json!({"x": 1})).to_string())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_503_with_retry_after() {
    let engine = engine();
    // One sequence at a time and one waiting: a third concurrent request is refused.
    let opts = common::sched(1, 1);
    let state = AppState::new(ServerConfig::default(), engine, opts).expect("started");
    let app = router(state.clone());
    let long = json!({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 100000, "ignore_eos": true, "temperature": 0});
    let worker = state.ready().expect("ready").worker;
    let t = Instant::now();
    let mut tasks = Vec::new();
    // The first is admitted before the second is sent (two sent at once could both find the
    // queue empty-but-one, and the second would be refused).
    for want in [(1, 0), (1, 1)] {
        let (app, body) = (app.clone(), long.clone());
        tasks.push(tokio::spawn(async move { send(&app, "/v1/chat/completions", Body::from(body.to_string())).await.0 }));
        while (worker.load().running, worker.load().waiting) != want {
            assert!(t.elapsed() < Duration::from_secs(10), "want {want:?}: {:?}", worker.load());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (s, v, h) = send(&app, "/v1/chat/completions", Body::from(long.to_string())).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("busy"));
    assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    // Both clients give up: their requests leave the scheduler.
    tasks.iter().for_each(|t| t.abort());
    while worker.load().running + worker.load().waiting > 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the abandoned requests are cancelled: {:?}", worker.load());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_is_cancelled_and_others_go_on() {
    let engine = engine();
    let opts = common::sched(4, 8);
    let state = AppState::new(ServerConfig::default(), engine, opts).expect("started");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().expect("an address");
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let body = json!({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 100000, "ignore_eos": true, "stream": true}).to_string();
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
    sock.write_all(head.as_bytes()).await.expect("writes");
    sock.write_all(body.as_bytes()).await.expect("writes");
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\"content\"") {
        let n = sock.read(&mut buf).await.expect("reads");
        assert!(n > 0, "the stream started");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let ready = state.ready().expect("ready");
    let t = Instant::now();
    while ready.worker.load().running == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the request is admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(sock);
    let t = Instant::now();
    while ready.worker.load().running > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the hung-up request leaves the scheduler");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server goes on.
    let mut s2 = tokio::net::TcpStream::connect(addr).await.expect("connects");
    s2.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("writes");
    let mut resp = String::new();
    s2.read_to_string(&mut resp).await.expect("reads");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

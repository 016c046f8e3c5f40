//! The server on the tiny checkpoint, through its router (no socket) and through a real
//! loopback socket: answers equal the library's for the same prompt (text, image, audio),
//! streams reassemble into the whole answer with OpenAI's chunk rules, logprob bytes add up to
//! the text, concurrent clients get their solo answers, a client that hangs up is cancelled,
//! and a table of bad requests gets the right status and an OpenAI error body.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure is the report

use axum::http::StatusCode;
use base64::Engine as _;
use phi4mm::{Engine, GenerateRequest, MediaInput, Message, PromptInput};
use phi4mm_server::{router, AppState, ServerConfig};
use serde_json::{json, Value};

mod common;
use common::{call, data_uri, engine, fixtures, post, sse_data, state};

/// The library's answer for one user message with markers and media (what the CLI runs).
fn library(engine: &Engine, text: &str, images: &[&str], audios: &[&str], max: usize) -> phi4mm::Completion {
    let mut r = GenerateRequest::new(PromptInput::Chat(vec![Message::new("user", text)]));
    r.images = images.iter().map(|f| MediaInput::Path(fixtures().join(f))).collect();
    r.audios = audios.iter().map(|f| MediaInput::Path(fixtures().join(f))).collect();
    r.max_new_tokens = max;
    r.ignore_eos = true;
    r.top_logprobs = 2;
    engine.generate(&r, |_| true).expect("the library generates")
}

fn greedy(content: Value, max: usize) -> Value {
    json!({"model": "microsoft/Phi-4-multimodal-instruct", "messages": [{"role": "user", "content": content}],
           "temperature": 0, "max_tokens": max, "ignore_eos": true, "logprobs": true, "top_logprobs": 2})
}

fn lp_bits(v: &Value) -> Vec<u32> {
    v["choices"][0]["logprobs"]["content"].as_array().map_or(Vec::new(), |c| c.iter().map(|t| (t["logprob"].as_f64().unwrap_or(0.0) as f32).to_bits()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_equal_the_library_for_text_image_and_audio() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let cases: Vec<(Value, &str, Vec<&str>, Vec<&str>)> = vec![
        (json!("Tell me about Rust."), "Tell me about Rust.", vec![], vec![]),
        (
            json!([{"type": "image_url", "image_url": {"url": data_uri("images/wide_500x300.png", "image/png")}}, {"type": "text", "text": "What is shown?"}]),
            "<|image_1|>What is shown?",
            vec!["images/wide_500x300.png"],
            vec![],
        ),
        (
            json!([{"type": "input_audio", "input_audio": {"data": base64::engine::general_purpose::STANDARD.encode(std::fs::read(fixtures().join("audio/speech_1s_16k.wav")).unwrap_or_default()), "format": "wav"}}, {"type": "text", "text": "Transcribe the audio clip into text."}]),
            "<|audio_1|>Transcribe the audio clip into text.",
            vec![],
            vec!["audio/speech_1s_16k.wav"],
        ),
        (
            json!([{"type": "text", "text": "Answer: "}, {"type": "image_url", "image_url": {"url": data_uri("images/square_448x448.png", "image/png")}}, {"type": "audio_url", "audio_url": {"url": data_uri("audio/speech_1s_16k.wav", "audio/wav")}}]),
            "Answer: <|image_1|><|audio_1|>",
            vec!["images/square_448x448.png"],
            vec!["audio/speech_1s_16k.wav"],
        ),
    ];
    for (content, text, images, audios) in cases {
        let (s, v) = post(&app, "/v1/chat/completions", greedy(content, 8)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let want = library(&engine, text, &images, &audios, 8);
        assert_eq!(v["choices"][0]["message"]["content"], json!(want.text), "{text}");
        let bits: Vec<u32> = want.logprobs.iter().map(|t| t.logprob.to_bits()).collect();
        assert_eq!(lp_bits(&v), bits, "{text}: the same log-probabilities");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["usage"]["prompt_tokens"], json!(want.prompt_tokens.len()));
        assert_eq!(v["usage"]["completion_tokens"], json!(8));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        // The logprob bytes of the tokens add up to the text.
        let bytes: Vec<u8> = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["bytes"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b.as_u64().map(|b| b as u8))
            .collect();
        // (A random model may emit a broken UTF-8 sequence: the text has U+FFFD, the bytes are exact.)
        assert_eq!(String::from_utf8_lossy(&bytes), want.text, "{text}: logprob bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reassembles_into_the_whole_answer() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let mut req = greedy(json!("Write a poem."), 12);
    let (_, whole) = post(&app, "/v1/chat/completions", req.clone()).await;
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (s, body, headers) = call(&app, "POST", "/v1/chat/completions", Some(req), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers["content-type"].to_str().unwrap_or("").starts_with("text/event-stream"));
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("JSON chunks")).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id && c["object"] == "chat.completion.chunk"));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap_or("?"));
    let usage = chunks.last().expect("a usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    let finishes: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, vec![&json!("length")]);
    let bits: Vec<u32> = chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"][0]["logprob"].as_f64()).map(|l| (l as f32).to_bits()).collect();
    assert_eq!(bits, lp_bits(&whole), "streamed logprobs equal the whole answer's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_their_solo_answers() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let prompts = ["Tell me about Rust.", "Write a poem.", "Say hello.", "Count to five."];
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(post(&app, "/v1/chat/completions", greedy(json!(p), 10)).await.1);
    }
    let mut sampled = greedy(json!("Say hello."), 10);
    sampled["temperature"] = json!(0.9);
    sampled["seed"] = json!(7);
    let sampled_solo = post(&app, "/v1/chat/completions", sampled.clone()).await.1;
    let mut tasks = Vec::new();
    for p in prompts {
        let app = app.clone();
        tasks.push(tokio::spawn(async move { post(&app, "/v1/chat/completions", greedy(json!(p), 10)).await.1 }));
    }
    let app2 = app.clone();
    let s2 = sampled.clone();
    let sampled_task = tokio::spawn(async move { post(&app2, "/v1/chat/completions", s2).await.1 });
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t.await.expect("a task");
        assert_eq!(v["choices"], solo[i]["choices"], "client {i}");
    }
    assert_eq!(sampled_task.await.expect("a task")["choices"], sampled_solo["choices"]);
    // n = 2 with a seed: choice 0 is the seed's answer.
    sampled["n"] = json!(2);
    let (s, v) = post(&app, "/v1/chat/completions", sampled).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["choices"][0]["message"], sampled_solo["choices"][0]["message"]);
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["usage"]["completion_tokens"], json!(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_tokenize_and_completions() {
    let engine = engine();
    let loading = AppState::loading(ServerConfig::default()).expect("metrics");
    let (s, b, _) = call(&router(loading.clone()), "GET", "/health", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(serde_json::from_slice::<Value>(&b).expect("an error body")["error"]["message"].as_str().unwrap_or("").contains("loading"));
    loading.set_ready(engine.clone(), common::sched(8, 16)).expect("ready");
    let app = router(loading);
    let (s, b, _) = call(&app, "GET", "/health", None, None).await;
    assert_eq!((s, serde_json::from_slice::<Value>(&b).ok()), (StatusCode::OK, Some(json!({"status": "ok"}))));
    let (s, b, _) = call(&app, "GET", "/v1/models", None, None).await;
    let v: Value = serde_json::from_slice(&b).expect("JSON");
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = v["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, vec!["microsoft/Phi-4-multimodal-instruct", "vision", "speech"]);
    let (s, v) = post(&app, "/tokenize", json!({"prompt": "Hello world"})).await;
    assert_eq!(s, StatusCode::OK);
    let ids = v["tokens"].clone();
    assert_eq!(ids, json!(engine.tokenizer().encode("Hello world").unwrap_or_default()));
    let (s, v) = post(&app, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!((s, v["prompt"].as_str()), (StatusCode::OK, Some("Hello world")));
    let (s, v) = post(&app, "/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(s, StatusCode::OK);
    let templ = engine.tokenizer().apply_chat_template(&[Message::new("user", "Hi")], true).unwrap_or_default();
    assert_eq!(v["tokens"], json!(engine.tokenizer().encode(&templ).unwrap_or_default()));
    // The legacy endpoint: a raw prompt, echo, legacy logprobs.
    let (s, v) = post(&app, "/v1/completions", json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 2, "ignore_eos": true})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut r = GenerateRequest::new(PromptInput::Raw("Once upon a time".into()));
    r.max_new_tokens = 6;
    r.ignore_eos = true;
    let want = engine.generate(&r, |_| true).expect("generates");
    assert_eq!(v["choices"][0]["text"], json!(format!("Once upon a time{}", want.text)));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["logprobs"]["tokens"].as_array().map(Vec::len), Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_every_route_but_health() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig { api_key: Some("sekrit".into()), ..ServerConfig::default() }));
    let (s, b, h) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(serde_json::from_slice::<Value>(&b).expect("JSON")["error"]["type"], "authentication_error");
    assert!(h.contains_key("www-authenticate"));
    assert_eq!(call(&app, "GET", "/v1/models", None, Some("wrong")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "POST", "/v1/chat/completions", Some(greedy(json!("Hi"), 2)), None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "GET", "/v1/models", None, Some("sekrit")).await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/health", None, None).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_that_ran_is_named_in_a_header() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let image = json!({"type": "image_url", "image_url": {"url": data_uri("images/square_448x448.png", "image/png")}});
    let audio = json!({"type": "audio_url", "audio_url": {"url": data_uri("audio/speech_1s_16k.wav", "audio/wav")}});
    let text = json!({"type": "text", "text": "Hi"});
    let cases = [(json!("Hi"), "text"), (json!([image, text]), "vision"), (json!([audio, text]), "speech"), (json!([image, audio, text]), "vision")];
    for (content, want) in cases {
        for stream in [false, true] {
            let mut body = greedy(content.clone(), 2);
            body["stream"] = json!(stream);
            let (s, b, h) = call(&app, "POST", "/v1/chat/completions", Some(body), None).await;
            assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            assert_eq!(h.get("x-phi4mm-adapter").and_then(|v| v.to_str().ok()), Some(want), "stream {stream}");
        }
    }
    let (_, _, h) = call(&app, "POST", "/v1/chat/completions", Some(json!({"model": "speech", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})), None).await;
    assert_eq!(h.get("x-phi4mm-adapter").and_then(|v| v.to_str().ok()), Some("speech"), "`model: speech` picks the adapter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_is_served_without_a_key_unless_turned_off() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig { api_key: Some("sekrit".into()), ..ServerConfig::default() }));
    let (s, b, h) = call(&app, "GET", "/", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&b).contains("<script type=\"module\" src=\"/ui/js/main.js\">"));
    assert!(h["content-type"].to_str().unwrap_or("").starts_with("text/html"));
    assert!(h["content-security-policy"].to_str().unwrap_or("").contains("default-src 'self'"));
    let (s, _, h) = call(&app, "GET", "/ui/js/main.js", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap_or("").starts_with("text/javascript"));
    let (s, b, _) = call(&app, "GET", "/ui/js/missing.js", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(serde_json::from_slice::<Value>(&b).expect("an error body")["error"]["type"], "not_found_error");
    assert_eq!(call(&app, "GET", "/v1/models", None, None).await.0, StatusCode::UNAUTHORIZED, "the API still needs the key");

    let off = router(state(&engine, ServerConfig { ui: false, ..ServerConfig::default() }));
    assert_eq!(call(&off, "GET", "/", None, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(call(&off, "GET", "/ui/js/main.js", None, None).await.0, StatusCode::NOT_FOUND);
}

//! A bounded load test on a real loopback socket: 32 clients at once, each sending a mix of
//! text, image, audio, streamed and schema-constrained requests (greedy, so each has one right
//! answer), against a server that admits 8 and queues 16. Every answer equals its solo answer;
//! the only errors are the deliberate 503s of a full queue (retried after `Retry-After`); the
//! process's resident memory after the load stays within a bound of where it was after a warm-up.
//! Bounded in count (32 × 4 requests) and in time (each request times out).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use phi4mm_server::{router, ServerConfig};
use serde_json::{json, Value};

mod common;
use common::{data_uri, engine, sse_data};

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()).map_or(0.0, |k| k / 1024.0)
}

fn kinds() -> Vec<Value> {
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    vec![
        json!({"messages": user(json!("Tell me about Rust.")), "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        json!({"messages": user(json!([{"type": "image_url", "image_url": {"url": data_uri("images/wide_500x300.png", "image/png")}}, {"type": "text", "text": "What is shown?"}])), "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        json!({"messages": user(json!([{"type": "audio_url", "audio_url": {"url": data_uri("audio/speech_1s_16k.wav", "audio/wav")}}, {"type": "text", "text": "Transcribe."}])), "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        json!({"messages": user(json!("Write a poem.")), "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": true}),
        json!({"messages": user(json!("JSON please.")), "max_tokens": 20, "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
    ]
}

/// The answer's text (streamed answers reassembled), retrying deliberate 503s; and how many 503s.
async fn ask(client: &reqwest::Client, url: &str, body: &Value) -> (String, usize) {
    let mut busy = 0;
    loop {
        let r = client.post(url).header("content-type", "application/json").body(body.to_string()).send().await.expect("the server answers");
        let status = r.status().as_u16();
        if status == 503 {
            assert!(r.headers().contains_key("retry-after"));
            busy += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(status, 200, "{body}");
        let bytes = r.bytes().await.unwrap();
        if body["stream"] == json!(true) {
            let text: String = sse_data(&bytes)
                .iter()
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
                .collect();
            return (text, busy);
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        return (v["choices"][0]["message"]["content"].as_str().unwrap().to_string(), busy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_get_their_solo_answers_with_bounded_memory() {
    let engine = engine();
    let state = phi4mm_server::AppState::new(ServerConfig::default(), engine, common::sched(8, 16)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/chat/completions", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let kinds = kinds();
    let mut solo = Vec::new();
    for k in &kinds {
        solo.push(ask(&client, &url, k).await.0);
    }
    let warm = rss_mib();
    let mut tasks = Vec::new();
    for c in 0..32usize {
        let (client, url, kinds) = (client.clone(), url.clone(), kinds.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for r in 0..4 {
                let k = (c + r) % kinds.len();
                let (text, busy) = ask(&client, &url, &kinds[k]).await;
                out.push((k, text, busy));
            }
            out
        }));
    }
    let mut busy = 0;
    for t in tasks {
        for (k, text, b) in t.await.unwrap() {
            assert_eq!(text, solo[k], "kind {k} under load equals its solo answer");
            busy += b;
        }
    }
    let after = rss_mib();
    eprintln!("load: 128 requests from 32 clients, {busy} deliberate 503s retried; RSS {warm:.0} MiB after warm-up, {after:.0} MiB after the load");
    assert!(after < warm + 512.0, "resident memory grew from {warm:.0} to {after:.0} MiB");
}

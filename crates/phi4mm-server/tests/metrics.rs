//! `/metrics` on the tiny checkpoint: the inference gateway's vLLM-named gauges follow a
//! running request (running count, KV use, the adapter in `vllm:lora_requests_info`) and fall
//! back when it ends; latency histograms, token counters, media encode time and per-route
//! request counts move with the traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use phi4mm_server::{router, ServerConfig};
use serde_json::json;
use tower::ServiceExt;

mod common;
use common::{call, data_uri, engine, post, state};

/// The value of the first series whose line starts with `prefix`.
fn value(text: &str, prefix: &str) -> f64 {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no series `{prefix}` in\n{text}"))
}

async fn scrape(app: &axum::Router) -> String {
    let (s, b, h) = call(app, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/plain"));
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_follow_a_running_request_and_counters_the_traffic() {
    let engine = engine();
    let app = router(state(&engine, ServerConfig::default()));
    let idle = scrape(&app).await;
    assert_eq!(value(&idle, "vllm:num_requests_running "), 0.0);
    assert_eq!(value(&idle, "vllm:num_requests_waiting "), 0.0);
    assert_eq!(value(&idle, "vllm:kv_cache_usage_perc "), 0.0);
    assert!(idle.contains("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}"), "{idle}");
    // A long streamed image request: while it runs, the gauges show it.
    let body = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri("images/square_448x448.png", "image/png")}}, {"type": "text", "text": "Describe."}]}],
                      "max_tokens": 400, "ignore_eos": true, "temperature": 0, "stream": true});
    let req = Request::builder().method("POST").uri("/v1/chat/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let mut stream = resp.into_body();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let frame = stream.frame().await.expect("the stream goes on").unwrap();
        if let Some(d) = frame.data_ref() {
            seen.push_str(&String::from_utf8_lossy(d));
        }
    }
    let busy = scrape(&app).await;
    assert_eq!(value(&busy, "vllm:num_requests_running "), 1.0, "{busy}");
    assert!(value(&busy, "vllm:kv_cache_usage_perc ") > 0.0);
    assert!(busy.contains("running_lora_adapters=\"vision\""), "{busy}");
    assert!(value(&busy, "phi4mm_media_encode_seconds_count{medium=\"image\"}") >= 1.0);
    assert!(value(&busy, "phi4mm_time_to_first_token_seconds_count") >= 1.0);
    drop(stream); // the client goes away: the request is cancelled
    let mut after = String::new();
    for _ in 0..100 {
        after = scrape(&app).await;
        if value(&after, "vllm:num_requests_running ") == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(value(&after, "vllm:num_requests_running "), 0.0, "{after}");
    assert_eq!(value(&after, "phi4mm_request_success_total{finish_reason=\"abort\"}"), 1.0);
    // A whole answer moves the counters and histograms.
    let (s, _) = post(&app, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": true})).await;
    assert_eq!(s, StatusCode::OK);
    let t = scrape(&app).await;
    assert_eq!(value(&t, "phi4mm_request_success_total{finish_reason=\"length\"}"), 1.0);
    assert!(value(&t, "phi4mm_generation_tokens_total") >= 5.0);
    assert!(value(&t, "phi4mm_prompt_tokens_total") > 0.0);
    assert!(value(&t, "phi4mm_inter_token_latency_seconds_count") >= 4.0);
    assert_eq!(value(&t, "phi4mm_e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(value(&t, "phi4mm_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"), 2.0);
    assert!(value(&t, "phi4mm_http_requests_total{route=\"/metrics\",status=\"200\"}") >= 3.0);
}

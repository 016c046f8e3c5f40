//! What the server tests share: the fixtures, the tiny engine, a scheduler without caches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)] // test code

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use phi4mm::{DType, Engine, LoadOptions, SchedulerOptions};
use phi4mm_server::{AppState, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The tiny checkpoint in f32.
pub fn engine() -> Arc<Engine> {
    let opts = LoadOptions { dtype: DType::F32, ..Default::default() };
    Arc::new(Engine::load(&fixtures().join("tiny"), opts).expect("the tiny checkpoint loads"))
}

/// Up to `max_batch` sequences and `max_queue` waiting, no caches (as `Engine::generate`).
pub fn sched(max_batch: usize, max_queue: usize) -> SchedulerOptions {
    SchedulerOptions { max_batch, max_queue, kv_budget: 1 << 20, ..SchedulerOptions::single() }
}

pub fn state(engine: &Arc<Engine>, config: ServerConfig) -> AppState {
    AppState::new(config, engine.clone(), sched(8, 16)).expect("the scheduler thread starts")
}

pub async fn call(app: &axum::Router, method: &str, path: &str, body: Option<Value>, key: Option<&str>) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
    let mut b = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let req = b.body(body.map_or(Body::empty(), |v| Body::from(v.to_string()))).expect("a request");
    let resp = app.clone().oneshot(req).await.expect("the router answers");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("the body").to_bytes().to_vec();
    (parts.status, bytes, parts.headers)
}

pub async fn post(app: &axum::Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b, _) = call(app, "POST", path, Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&b)})))
}

pub fn data_uri(file: &str, mime: &str) -> String {
    let bytes = std::fs::read(fixtures().join(file)).expect("a fixture");
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body).lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

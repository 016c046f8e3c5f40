//! `GET /metrics` in Prometheus' text format: HTTP requests by route and status, requests by
//! finish reason, time to first token, inter-token latency and end-to-end latency histograms
//! (measured on the scheduler's thread, from a request's arrival there), prompt and generated
//! tokens, running and waiting requests, KV use, media encode time, grammar mask time, and the
//! gauges the Kubernetes Gateway API Inference Extension / llm-d endpoint picker reads under
//! vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`), so replicas of this server are
//! balanced by that router with its defaults.

use std::sync::atomic::Ordering;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::AppState;

/// Every series the server exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub finished: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub media_encode: HistogramVec,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    vllm_running: Gauge,
    vllm_waiting: Gauge,
    vllm_kv: Gauge,
    lora_info: GaugeVec,
    grammar_masks: IntGauge,
    grammar_seconds: Gauge,
}

/// Latency buckets in seconds (vLLM's spread, 1 ms to 20 min).
const LATENCY: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 1200.0];

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let ttft = hist("phi4mm_time_to_first_token_seconds", "Time from a request's arrival at the scheduler to its first token")?;
        let itl = hist("phi4mm_inter_token_latency_seconds", "Time between consecutive tokens of one request")?;
        let e2e = hist("phi4mm_e2e_request_latency_seconds", "Time from a request's arrival at the scheduler to its end")?;
        let media_encode =
            HistogramVec::new(HistogramOpts::new("phi4mm_media_encode_seconds", "Wall time of the steps that encoded a request's images or audio").buckets(LATENCY.to_vec()), &["medium"])?;
        let http_requests = IntCounterVec::new(Opts::new("phi4mm_http_requests_total", "HTTP requests by route and status"), &["route", "status"])?;
        let finished = IntCounterVec::new(Opts::new("phi4mm_request_success_total", "Finished requests by finish reason"), &["finish_reason"])?;
        let prompt_tokens = IntCounter::new("phi4mm_prompt_tokens_total", "Prompt tokens of finished requests")?;
        let generation_tokens = IntCounter::new("phi4mm_generation_tokens_total", "Tokens generated")?;
        let running = IntGauge::new("phi4mm_num_requests_running", "Requests in the running batch")?;
        let waiting = IntGauge::new("phi4mm_num_requests_waiting", "Requests waiting to be admitted")?;
        let kv_usage = Gauge::new("phi4mm_kv_cache_usage_perc", "KV cache reserved / budget (0 to 1)")?;
        let vllm_running = Gauge::new("vllm:num_requests_running", "Requests in the running batch (vLLM's name, for the inference gateway)")?;
        let vllm_waiting = Gauge::new("vllm:num_requests_waiting", "Requests waiting (vLLM's name, for the inference gateway)")?;
        let vllm_kv = Gauge::new("vllm:kv_cache_usage_perc", "KV cache use, 0 to 1 (vLLM's name, for the inference gateway)")?;
        let lora_info =
            GaugeVec::new(Opts::new("vllm:lora_requests_info", "Adapters running and waiting; the value is the time of the update"), &["running_lora_adapters", "waiting_lora_adapters", "max_lora"])?;
        let grammar_masks = IntGauge::new("phi4mm_grammar_masks_total", "Grammar token masks computed (structured output)")?;
        let grammar_seconds = Gauge::new("phi4mm_grammar_mask_seconds_total", "CPU time spent computing grammar token masks")?;
        for c in [&http_requests, &finished] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(media_encode.clone()))?;
        for c in [&prompt_tokens, &generation_tokens] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&running, &waiting, &grammar_masks] {
            registry.register(Box::new(g.clone()))?;
        }
        for g in [&kv_usage, &vllm_running, &vllm_waiting, &vllm_kv, &grammar_seconds] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(lora_info.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            finished,
            ttft,
            itl,
            e2e,
            prompt_tokens,
            generation_tokens,
            media_encode,
            running,
            waiting,
            kv_usage,
            vllm_running,
            vllm_waiting,
            vllm_kv,
            lora_info,
            grammar_masks,
            grammar_seconds,
        })
    }

    /// The gauges as of now, then every series as text.
    fn render(&self, app: &AppState) -> String {
        if let Ok(ready) = app.ready() {
            let l = ready.worker.load();
            let kv = if l.kv_budget == 0 { 0.0 } else { (l.kv_reserved as f64 / l.kv_budget as f64).min(1.0) };
            self.running.set(l.running as i64);
            self.waiting.set(l.waiting as i64);
            self.kv_usage.set(kv);
            self.vllm_running.set(l.running as f64);
            self.vllm_waiting.set(l.waiting as f64);
            self.vllm_kv.set(kv);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            self.lora_info.reset();
            self.lora_info.with_label_values(&[l.running_adapters.as_str(), l.waiting_adapters.as_str(), "2"]).set(now);
            if let Some(g) = ready.grammars.built() {
                self.grammar_masks.set(g.stats().masks.load(Ordering::Relaxed) as i64);
                self.grammar_seconds.set(g.stats().nanos.load(Ordering::Relaxed) as f64 / 1e9);
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail but for a malformed family, which `new` rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let body = app.metrics.render(&app);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

/// Counts every request by its route pattern and status.
pub async fn count(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    app.metrics.http_requests.with_label_values(&[route.as_str(), resp.status().as_str()]).inc();
    resp
}

//! The OpenAI-compatible HTTP server of phi4mm: `POST /v1/chat/completions` (text, images,
//! audio; streamed or not), `POST /v1/completions`, `POST /tokenize`, `POST /detokenize`,
//! `GET /v1/models`, `GET /health`, and the chat page at `/` ([`ui`]). It sees only the
//! library's public API and never touches a tensor: requests are validated into library
//! requests in [`wire`], run on the scheduler's thread ([`worker`]), and every error becomes an
//! OpenAI error body in [`error`].
//!
//! [`router`] builds the routes over an [`AppState`] (tests drive it without a socket);
//! [`serve`] binds, answers `/health` with 503 while the model loads, then serves.

pub mod audio;
pub mod chat;
pub mod error;
pub mod fetch;
pub mod metrics;
pub mod stream;
pub mod structured;
pub mod tools;
pub mod ui;
pub mod wire;
pub mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use phi4mm::{Engine, SchedulerOptions};
use serde::Deserialize;
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::wire::Limits;
use crate::worker::Worker;

/// How the server behaves (from the command line).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The `model` clients send and `/v1/models` lists.
    pub served_model_name: String,
    /// Bearer key every route but `/health` needs, when set.
    pub api_key: Option<String>,
    pub limits: Limits,
    /// Largest request body in bytes (larger is 413).
    pub max_body_bytes: usize,
    /// `Access-Control-Allow-Origin` values (none: no CORS headers).
    pub cors_origins: Vec<String>,
    /// Where media URLs may point.
    pub media: fetch::MediaPolicy,
    /// Serve the chat page at `/` (its files under `/ui/`).
    pub ui: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            served_model_name: "microsoft/Phi-4-multimodal-instruct".into(),
            api_key: None,
            limits: Limits { images: 8, audios: 4, n: 8, default_max_tokens: 4096 },
            max_body_bytes: 64 << 20,
            cors_origins: Vec::new(),
            media: fetch::MediaPolicy::default(),
            ui: true,
        }
    }
}

/// The loaded model and its scheduler thread.
#[derive(Clone)]
pub struct Ready {
    pub engine: Arc<Engine>,
    pub worker: Worker,
    /// The grammar engine for structured output, built on first use.
    pub grammars: Arc<structured::Engines>,
}

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub metrics: Arc<metrics::Metrics>,
    pub fetcher: Arc<fetch::Fetcher>,
    ready: Arc<OnceLock<Ready>>,
}

impl AppState {
    /// A server whose model is still loading (`/health` answers 503 until [`AppState::set_ready`]).
    pub fn loading(config: ServerConfig) -> std::io::Result<Self> {
        let metrics = metrics::Metrics::new().map_err(std::io::Error::other)?;
        let fetcher = fetch::Fetcher::new(config.media.clone())?;
        Ok(AppState { config: Arc::new(config), metrics: Arc::new(metrics), fetcher: Arc::new(fetcher), ready: Arc::new(OnceLock::new()) })
    }

    /// A server on a loaded engine, its scheduler thread started with `opts`.
    pub fn new(config: ServerConfig, engine: Arc<Engine>, opts: SchedulerOptions) -> std::io::Result<Self> {
        let s = Self::loading(config)?;
        s.set_ready(engine, opts)?;
        Ok(s)
    }

    /// The model is loaded: starts the scheduler thread and begins serving.
    pub fn set_ready(&self, engine: Arc<Engine>, opts: SchedulerOptions) -> std::io::Result<()> {
        let worker = Worker::start(engine.clone(), opts, self.metrics.clone())?;
        let _ = self.ready.set(Ready { engine, worker, grammars: Arc::default() });
        Ok(())
    }

    /// The loaded model, or 503 while it loads.
    pub fn ready(&self) -> ApiResult<Ready> {
        self.ready.get().cloned().ok_or_else(ApiError::loading)
    }
}

/// Every route over `state`.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/audio/transcriptions", post(audio::transcriptions))
        .route("/v1/audio/translations", post(audio::translations))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics::metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let mut r = Router::new().route("/health", get(health)).merge(api);
    if state.config.ui {
        r = r.merge(ui::routes());
    }
    let mut r = r.route_layer(middleware::from_fn_with_state(state.clone(), metrics::count)).fallback(not_found).layer(DefaultBodyLimit::max(limit)).with_state(state.clone());
    if !state.config.cors_origins.is_empty() {
        let origins: Vec<_> = state.config.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
        let cors = tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods(tower_http::cors::Any)
            .allow_headers(tower_http::cors::Any)
            .expose_headers([header::HeaderName::from_static(chat::ADAPTER_HEADER)]);
        r = r.layer(cors);
    }
    r
}

/// Binds `addr` at once (so `/health` answers while loading), runs `load` on a blocking
/// thread, then serves until Ctrl-C.
pub async fn serve(
    addr: SocketAddr,
    config: ServerConfig,
    opts: impl FnOnce(&Engine) -> SchedulerOptions + Send + 'static,
    load: impl FnOnce() -> phi4mm::Result<Engine> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState::loading(config)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let loading = state.clone();
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
    tokio::task::spawn_blocking(move || {
        let ready = load().map_err(std::io::Error::other).and_then(|engine| {
            let o = opts(&engine);
            loading.set_ready(Arc::new(engine), o)
        });
        match ready {
            Ok(()) => tracing::info!("model loaded; serving"),
            Err(e) => {
                let _ = failed_tx.send(e);
            }
        }
    });
    let failure = Arc::new(std::sync::Mutex::new(None));
    let seen = failure.clone();
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Ok(e) = failed_rx => {
                if let Ok(mut f) = seen.lock() {
                    *f = Some(e);
                }
            }
        }
    };
    axum::serve(listener, router(state)).with_graceful_shutdown(stop).await?;
    match failure.lock().ok().and_then(|mut f| f.take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `Authorization: Bearer <key>` when the server has a key.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<AppState>) -> Response {
    match state.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route")
}

/// The served model and its two adapters (vLLM lists LoRAs as models whose parent is the base).
async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let name = &state.config.served_model_name;
    let card = |id: &str, parent: Option<&str>| json!({"id": id, "object": "model", "created": 0, "owned_by": "phi4mm", "root": name, "parent": parent});
    Json(json!({"object": "list", "data": [card(name, None), card("vision", Some(name)), card("speech", Some(name))]}))
}

#[derive(Deserialize)]
struct TokenizeRequest {
    prompt: Option<String>,
    messages: Option<Vec<wire::ChatMessage>>,
}

/// vLLM's `/tokenize`: a prompt string, or chat messages rendered with the template.
async fn tokenize(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<serde_json::Value>> {
    let ready = state.ready()?;
    let req: TokenizeRequest = chat::parse(body)?;
    let tok = ready.engine.tokenizer();
    let text = match (&req.prompt, &req.messages) {
        (Some(p), None) => p.clone(),
        (None, Some(m)) => {
            let (msgs, _, _) = wire::chat_prompt(m, &Limits { images: usize::MAX, audios: usize::MAX, ..state.config.limits })?;
            tok.apply_chat_template(&msgs, true)?
        }
        _ => return Err(ApiError::bad_request("give exactly one of `prompt` and `messages`")),
    };
    let ids = tok.encode(&text)?;
    Ok(Json(json!({"count": ids.len(), "max_model_len": ready.engine.max_context(), "tokens": ids})))
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<serde_json::Value>> {
    let ready = state.ready()?;
    let req: DetokenizeRequest = chat::parse(body)?;
    let vocab = ready.engine.tokenizer().vocab_size() as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::bad_param("tokens", format!("token id {bad} is outside the vocabulary ({vocab} ids)")));
    }
    Ok(Json(json!({"prompt": ready.engine.tokenizer().decode(&req.tokens, false)?})))
}

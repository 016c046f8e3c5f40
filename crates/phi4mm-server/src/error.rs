//! The one place errors become HTTP: a status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}` (the `openai` SDK turns the status into
//! its exception class and reads the body into the exception). Library errors map here by kind.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`, …
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A short machine-readable code (`model_not_found`, `context_length_exceeded`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..Self::bad_request(message) }
    }

    pub fn unauthorized() -> Self {
        let e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing or invalid API key: send `Authorization: Bearer <key>`");
        ApiError { code: Some("invalid_api_key"), ..e }
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        let e = Self::new(StatusCode::NOT_FOUND, "not_found_error", format!("the model `{model}` does not exist: this server serves `{served}` (and its adapters `vision`, `speech`)"));
        ApiError { param: Some("model".into()), code: Some("model_not_found"), ..e }
    }

    pub fn loading() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "the model is still loading; retry shortly")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// Names the field at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The body alone (also sent as a `data:` event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<phi4mm::Error> for ApiError {
    fn from(e: phi4mm::Error) -> Self {
        use phi4mm::Error as E;
        let message = e.to_string();
        match e {
            E::QueueFull(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message).with_code("queue_full"),
            E::Request(_) if message.contains("context") => Self::bad_request(message).with_code("context_length_exceeded"),
            E::Request(_) | E::Template(_) | E::Tokenizer(_) => Self::bad_request(message),
            E::Media(_) => Self::bad_request(message).with_code("invalid_media"),
            E::Unsupported(_) => Self::bad_request(message).with_code("unsupported"),
            _ => Self::internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

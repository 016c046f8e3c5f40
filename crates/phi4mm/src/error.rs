//! The library's one error type. Every variant names the thing that went wrong (a file, a
//! tensor, a config key) so that the message alone tells the user what to fix.

use std::path::PathBuf;

/// Errors returned by the phi4mm library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model could not be found locally; the message says how to get it.
    #[error("{0}")]
    ModelNotFound(String),

    /// A file the model needs is missing from the model directory.
    #[error("{what} not found: {path} ({hint})")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },

    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is malformed or has the wrong shape.
    #[error("invalid {path}: {message}")]
    BadJson { path: PathBuf, message: String },

    /// `config.json` parsed but describes something we cannot run.
    #[error("unsupported or invalid config.json: {0}")]
    BadConfig(String),

    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{0}` is missing from the checkpoint")]
    MissingTensor(String),

    /// A tensor has an unexpected shape.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// A tensor is stored in a dtype we cannot load.
    #[error("tensor `{name}` is stored as {dtype}; only bf16, f16 and f32 are supported")]
    TensorDtype { name: String, dtype: String },

    /// The safetensors files themselves are unreadable or corrupt.
    #[error("cannot load checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),

    /// The request is invalid (prompt too long, bad sampling values, media/marker mismatch…).
    #[error("{0}")]
    Request(String),

    /// A media input (image or audio) could not be used.
    #[error("{0}")]
    Media(String),

    /// The requested feature is not implemented yet.
    #[error("{0}")]
    Unsupported(String),

    /// The scheduler's queue of waiting requests is full (a server answers 503).
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),

    /// An error from the tensor backend.
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

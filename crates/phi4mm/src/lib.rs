//! phi4mm: run Microsoft Phi-4-multimodal-instruct from its official checkpoint.
//!
//! The data flows through one module per stage: [`hub`] finds the files, [`config`] and
//! [`weights`] read them, [`tokenizer`] and [`prompt`] turn a request into ids, [`decoder`]
//! (with [`lora`], [`rope`] and [`kv_cache`]) turns embeddings into logits, [`sampler`] and
//! [`detok`] turn logits into text, and [`engine`] runs the stages in order.

pub mod audio;
pub mod audio_features;
pub mod audio_io;
mod audio_subsample;
pub mod config;
pub mod decoder;
pub mod detok;
pub mod encoder_config;
pub mod engine;
pub mod error;
pub mod hub;
pub mod image_io;
pub mod image_prep;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod lora;
pub mod prompt;
pub mod quant;
pub mod quant_file;
pub mod request;
pub mod resample;
pub mod rope;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use candle_core::{DType, Device};
pub use engine::{
    Completion, Engine, FinishReason, GenerateRequest, LoadOptions, MediaInput, PromptInput, Step,
};
pub use error::{Error, Result};
pub use prompt::Mode;
pub use sampler::SamplingParams;
pub use scheduler::{Event, RequestId, Scheduler, SchedulerOptions};
pub use tokenizer::Message;

/// Worker threads the CPU backend uses (`RAYON_NUM_THREADS`, else one per physical core).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

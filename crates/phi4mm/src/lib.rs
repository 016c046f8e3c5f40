//! phi4mm: run Microsoft Phi-4-multimodal-instruct from its official checkpoint.
//!
//! One folder per stage, as the data flows: [`model`] finds and reads the checkpoint (hub,
//! config, weights, quantised formats), [`text`] turns a request into ids and logits back into
//! text (tokenizer, chat template, prompt, sampler, detokenizer), [`vision`] and [`audio`] turn
//! media into features, [`decoder`] (LoRA, LongRoPE, KV cache) turns embeddings into logits on
//! the [`kernels`], [`engine`] runs the stages in order for one request and [`scheduler`] runs
//! many requests together; [`eval`] scores predictions with the field's metrics and [`train`]
//! fine-tunes the LoRA adapters. Dependencies point one way: nothing below the engine knows about
//! requests.

pub mod audio;
pub mod decoder;
pub mod engine;
pub mod error;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod scheduler;
pub mod text;
pub mod train;
pub mod vision;

pub use candle_core::{DType, Device};
pub use engine::{
    Completion, Engine, FinishReason, GenerateRequest, LoadOptions, MediaInput, PromptInput, Step,
};
pub use error::{Error, Result};
pub use text::prompt::Mode;
pub use text::sampler::SamplingParams;
pub use scheduler::{Event, RequestId, Scheduler, SchedulerOptions};
pub use text::tokenizer::Message;

/// Worker threads the CPU backend uses (`RAYON_NUM_THREADS`, else one per physical core).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

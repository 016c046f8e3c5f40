//! Text in and out: the tokenizer and chat template, prompt building (markers, placeholders),
//! the sampler and the streaming detokenizer (UTF-8 safe, stop strings).

pub mod detok;
pub mod grammar;
pub mod prompt;
pub mod sampler;
pub mod tokenizer;

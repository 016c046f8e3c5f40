//! Loading a checkpoint: the hub lookup, `config.json` and the encoders' settings, the
//! safetensors weights, and the quantised formats and files.

pub mod adapter;
pub mod config;
pub mod encoder_config;
pub mod hub;
pub mod quant;
pub mod quant_file;
pub mod weights;

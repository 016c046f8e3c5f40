//! `phi4mm quantize`: writes a checkpoint directory whose decoder projections are stored
//! quantised, so later loads map them straight from the file (no conversion, and pages of an
//! adapter a request never uses are never read).
//!
//! The output is one `model.safetensors` plus copies of the source's small files (config,
//! tokenizer, processor). A quantised matrix `name` is stored as two tensors: its quants
//! `name` (u8 `[rows, row_bytes]`) and its scales `name.scales` (f16 `[rows, cols/32]`); the
//! header metadata records `phi4mm.quant` (the format asked for), `phi4mm.layout` (the byte
//! layout's version) and `phi4mm.qtype.{name}` for each matrix. Every other tensor (norms, encoders) is copied byte for byte.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use safetensors::{Dtype as StDtype, View};

use crate::model::config::ModelConfig;
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::model::hub::ModelFiles;
use crate::model::quant::{QType, BLOCK};
use crate::model::weights::{ProgressFn, Weights, LAYOUT_KEY, LAYOUT_VERSION, QTYPE_KEY, SCALES_SUFFIX};

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub quantized_tensors: usize,
    pub copied_tensors: usize,
}

/// One tensor to write, borrowed from the source mapping or the quantised matrices.
struct Raw<'a> {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for Raw<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Quantises the decoder of the checkpoint in `src` to `qtype` and writes a loadable model
/// directory `out` (created if needed; an existing `model.safetensors` there is an error).
pub fn quantize_checkpoint(src: &Path, qtype: QType, out: &Path, progress: Option<ProgressFn>) -> Result<QuantizeSummary> {
    let files = ModelFiles::locate(src)?;
    let config = ModelConfig::from_file(&files.config)?;
    let mut weights = Weights::open(&files.weights, &Device::Cpu)?;
    if let Some(f) = weights.file_quant() {
        return Err(Error::Request(format!("{} is already quantised ({f}); quantise the original checkpoint", src.display())));
    }
    if let Some(p) = progress {
        weights = weights.with_progress(p);
    }
    let target = out.join("model.safetensors");
    if target.exists() {
        return Err(Error::Request(format!("{} exists; choose an empty output directory", target.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Loading the decoder quantises (and registers) every projection.
    drop(Decoder::load(&config, &weights, DType::BF16, &Device::Cpu, Some(qtype))?);
    let quantized: HashMap<String, _> = weights.quantized().into_iter().collect();

    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("phi4mm.quant".to_string(), qtype.name().to_string()),
        (LAYOUT_KEY.to_string(), LAYOUT_VERSION.to_string()),
    ]);
    let mut tensors: Vec<(String, Raw<'_>)> = Vec::new();
    let mut copied = 0;
    for (name, dtype, shape, data) in weights.raw_tensors() {
        match quantized.get(&name) {
            Some(q) => {
                meta.insert(format!("{QTYPE_KEY}{name}"), q.qtype().name().to_string());
                tensors.push((
                    format!("{name}{SCALES_SUFFIX}"),
                    Raw { dtype: StDtype::F16, shape: vec![q.rows(), q.cols() / BLOCK], data: Cow::Owned(q.scale_bytes()) },
                ));
                tensors.push((
                    name,
                    Raw { dtype: StDtype::U8, shape: vec![q.rows(), q.qtype().row_bytes(q.cols())], data: Cow::Borrowed(q.qs()) },
                ));
            }
            None => {
                copied += 1;
                tensors.push((name, Raw { dtype, shape, data: Cow::Borrowed(data) }));
            }
        }
    }
    let n_quant = quantized.len();
    safetensors::serialize_to_file(tensors, Some(meta), &target).map_err(|e| Error::Checkpoint {
        path: target.clone(),
        message: format!("writing: {e}"),
    })?;
    copy_small_files(src, out)?;
    let bytes = std::fs::metadata(&target).map_err(|e| Error::io(&target, e))?.len();
    Ok(QuantizeSummary { path: target, bytes, quantized_tensors: n_quant, copied_tensors: copied })
}

/// Copies every regular file of `src` but the weights (config, tokenizer, processor files).
fn copy_small_files(src: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if !path.is_file() || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            continue;
        }
        std::fs::copy(&path, out.join(&name)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

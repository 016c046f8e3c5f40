//! Memory-mapped, sharded safetensors with checked lookups.
//!
//! Every lookup names the tensor and checks its shape; tensors that no module asked for are
//! reported (at debug level) once loading is done. Model structs load through [`Scope`], whose
//! prefixes follow the checkpoint's name tree (`model.layers.3.self_attn.qkv_proj…`).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::Dtype as StDtype;

use crate::error::{Error, Result};
use crate::kernels::Matrix;
use crate::model::quant::{Bytes, QMatrix, QType, BLOCK};

/// Metadata key naming the format of each quantised tensor (`phi4mm.qtype.{name}` = `q4_0`).
pub const QTYPE_KEY: &str = "phi4mm.qtype.";
/// Metadata key and value of the quantised layout this build reads (bumped when it changes).
pub const LAYOUT_KEY: &str = "phi4mm.layout";
pub const LAYOUT_VERSION: &str = "1";
/// Suffix of a quantised tensor's scales (`{name}.scales`, f16 `[rows, cols/32]`).
pub const SCALES_SUFFIX: &str = ".scales";

/// Called with (bytes loaded so far, total bytes of the checkpoint).
pub type ProgressFn = Box<dyn Fn(u64, u64)>;

/// Where one tensor lives.
struct Entry {
    shard: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// An open checkpoint (one or more safetensors shards).
pub struct Weights {
    shards: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
    quantized: RefCell<Vec<(String, Arc<QMatrix>)>>,
    device: Device,
    used: RefCell<BTreeSet<String>>,
    loaded_bytes: RefCell<u64>,
    total_bytes: u64,
    progress: Option<ProgressFn>,
}

impl Weights {
    /// Memory-maps the shards and parses (and validates) their headers.
    pub fn open(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        let mut metadata = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            check_header(p)?;
            let file = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            // SAFETY: mapped read-only; like every mmap-based loader we rely on the file not
            // being truncated while the model loads.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(p, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Checkpoint {
                path: p.clone(),
                message: e.to_string(),
            })?;
            if let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&mmap) {
                metadata.extend(meta.metadata().clone().unwrap_or_default());
            }
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                entries.insert(
                    name,
                    Entry {
                        shard: i,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        offset: data.as_ptr() as usize - base,
                        len: data.len(),
                    },
                );
            }
            shards.push((p.clone(), Arc::new(mmap)));
        }
        let total_bytes = entries.values().map(|e| e.len as u64).sum();
        Ok(Weights {
            shards,
            entries,
            metadata,
            quantized: RefCell::new(Vec::new()),
            device: device.clone(),
            used: RefCell::new(BTreeSet::new()),
            loaded_bytes: RefCell::new(0),
            total_bytes,
            progress: None,
        })
    }

    /// Reports loading progress to `f`.
    pub fn with_progress(mut self, f: ProgressFn) -> Self {
        self.progress = Some(f);
        self
    }

    /// The root scope (no prefix).
    pub fn root(&self) -> Scope<'_> {
        Scope {
            w: self,
            prefix: String::new(),
        }
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Loads `name`, checks its shape and converts it to `dtype`. The mapped pages are released
    /// once copied, so loading never holds the file and the tensors in memory at once.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        if e.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: e.shape.clone(),
            });
        }
        if !matches!(e.dtype, StDtype::BF16 | StDtype::F16 | StDtype::F32) {
            return Err(Error::TensorDtype {
                name: name.to_string(),
                dtype: format!("{:?}", e.dtype),
            });
        }
        let (path, mmap) = &self.shards[e.shard];
        let data = &mmap[e.offset..e.offset + e.len];
        let view = safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), data).map_err(
            |err| Error::Checkpoint {
                path: path.clone(),
                message: format!("{name}: {err}"),
            },
        )?;
        let t = view.load(&self.device)?.to_dtype(dtype)?;
        release(mmap, e.offset, e.len);
        self.mark_loaded(name, e.len);
        Ok(t)
    }

    /// Loads the `[rows, cols]` weight `name` for a linear layer: as stored if the file holds
    /// it quantised (mapped, not copied), quantised to `quant` if asked and the width allows
    /// (row by row from the mapped file), else dense in `dtype`.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize, dtype: DType, quant: Option<QType>) -> Result<Matrix> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        if e.dtype == StDtype::U8 {
            return Ok(Matrix::Quant(Arc::new(self.mapped_quant(name, e, rows, cols)?)));
        }
        let Some(qtype) = quant.filter(|_| cols % BLOCK == 0 && self.device.is_cpu()) else {
            return Ok(Matrix::Dense(self.load(name, &[rows, cols], dtype)?));
        };
        if e.shape != [rows, cols] {
            return Err(Error::TensorShape { name: name.to_string(), expected: vec![rows, cols], actual: e.shape.clone() });
        }
        let (_, mmap) = &self.shards[e.shard];
        let data = &mmap[e.offset..e.offset + e.len];
        let width = match e.dtype {
            StDtype::BF16 | StDtype::F16 => 2,
            StDtype::F32 => 4,
            other => return Err(Error::TensorDtype { name: name.to_string(), dtype: format!("{other:?}") }),
        };
        let dt = e.dtype;
        let q = QMatrix::quantize_rows(qtype, rows, cols, |r, out| {
            let row = &data[r * cols * width..(r + 1) * cols * width];
            for (o, c) in out.iter_mut().zip(row.chunks_exact(width)) {
                *o = match dt {
                    StDtype::BF16 => f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16),
                    StDtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                    _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                };
            }
        })?;
        release(mmap, e.offset, e.len);
        self.mark_loaded(name, e.len);
        let q = Arc::new(q);
        self.quantized.borrow_mut().push((name.to_string(), q.clone()));
        Ok(Matrix::Quant(q))
    }

    /// A quantised tensor of a file written by `phi4mm quantize`: quants `name` (u8
    /// `[rows, row_bytes]`) and scales `name.scales` (f16 `[rows, cols/32]`), used in place.
    fn mapped_quant(&self, name: &str, e: &Entry, rows: usize, cols: usize) -> Result<QMatrix> {
        let bad = |message: String| Error::Checkpoint { path: self.shards[e.shard].0.clone(), message: format!("{name}: {message}") };
        if self.metadata.get(LAYOUT_KEY).map(String::as_str) != Some(LAYOUT_VERSION) {
            return Err(bad(format!(
                "quantised with another layout ({LAYOUT_KEY} = {:?}, this build reads {LAYOUT_VERSION}); run `phi4mm quantize` again on the original checkpoint",
                self.metadata.get(LAYOUT_KEY)
            )));
        }
        let tag = self.metadata.get(&format!("{QTYPE_KEY}{name}")).ok_or_else(|| bad("u8 tensor without a quantisation format in the metadata".into()))?;
        let qtype = QType::parse(tag)?.ok_or_else(|| bad(format!("unknown quantisation format `{tag}`")))?;
        if e.shape != [rows, qtype.row_bytes(cols)] || cols % BLOCK != 0 {
            return Err(bad(format!("{} quants of shape {:?} do not make a [{rows}, {cols}] matrix", qtype.name(), e.shape)));
        }
        let sname = format!("{name}{SCALES_SUFFIX}");
        let se = self.entries.get(&sname).ok_or_else(|| Error::MissingTensor(sname.clone()))?;
        if se.dtype != StDtype::F16 || se.shape != [rows, cols / BLOCK] {
            return Err(bad(format!("scales are {:?} {:?}, expected F16 [{rows}, {}]", se.dtype, se.shape, cols / BLOCK)));
        }
        let map = |e: &Entry| Bytes::Mapped { map: self.shards[e.shard].1.clone(), start: e.offset, len: e.len };
        let q = QMatrix::from_parts(qtype, rows, cols, map(e), map(se))?;
        self.mark_loaded(name, e.len);
        self.mark_loaded(&sname, se.len);
        Ok(q)
    }

    /// The quantisation format recorded in the file (`phi4mm.quant`), if any.
    pub fn file_quant(&self) -> Option<&str> {
        self.metadata.get("phi4mm.quant").map(String::as_str)
    }

    /// Every matrix quantised while loading, by tensor name (for `phi4mm quantize`).
    pub fn quantized(&self) -> Vec<(String, Arc<QMatrix>)> {
        self.quantized.borrow().clone()
    }

    /// Every tensor: name, dtype, shape and stored bytes (for `phi4mm quantize`).
    pub fn raw_tensors(&self) -> Vec<(String, StDtype, Vec<usize>, &[u8])> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), e.dtype, e.shape.clone(), &self.shards[e.shard].1[e.offset..e.offset + e.len]))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn mark_loaded(&self, name: &str, len: usize) {
        self.used.borrow_mut().insert(name.to_string());
        let done = {
            let mut lb = self.loaded_bytes.borrow_mut();
            *lb += len as u64;
            *lb
        };
        if let Some(p) = &self.progress {
            p(done, self.total_bytes);
        }
    }

    /// Names present in the checkpoint that nothing loaded.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut names: Vec<String> =
            self.entries.keys().filter(|n| !used.contains(*n)).cloned().collect();
        names.sort();
        names
    }

    /// Total bytes of tensor data in the checkpoint.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

/// Drops the whole pages of `offset..offset+len` from this process's mapping (they are re-read
/// from the file if touched again).
fn release(mmap: &Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside a read-only shared file mapping and no reference
            // into it is alive (the tensor was copied); dropped pages are re-faulted from the
            // file if read again.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// A prefix within the checkpoint's name tree.
#[derive(Clone)]
pub struct Scope<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The sub-scope `prefix.name` (`pp` as in candle's VarBuilder).
    pub fn pp(&self, name: impl std::fmt::Display) -> Scope<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Scope { w: self.w, prefix }
    }

    /// The full name of `name` in this scope.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Loads `name` with the expected shape, converted to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.w.load(&self.name(name), shape, dtype)
    }

    /// Loads the linear weight `name` `[rows, cols]` (see [`Weights::matrix`]).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize, dtype: DType, quant: Option<QType>) -> Result<Matrix> {
        self.w.matrix(&self.name(name), rows, cols, dtype, quant)
    }

    /// Whether `name` exists in this scope.
    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(&self.name(name))
    }
}

/// Rejects files that are too short or whose header length is absurd before mmapping them, so a
/// truncated download gets a clear message.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head)
        .map_err(|_| bad(format!("file is only {len} bytes: not a safetensors file")))?;
    let n = u64::from_le_bytes(head);
    if n.saturating_add(8) > len {
        return Err(bad(format!(
            "header claims {n} bytes but the file has {len}: truncated or not safetensors"
        )));
    }
    Ok(())
}

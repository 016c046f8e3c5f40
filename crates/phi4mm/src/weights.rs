//! Memory-mapped, sharded safetensors with checked lookups.
//!
//! Every lookup names the tensor and checks its shape; tensors that no module asked for are
//! reported (at debug level) once loading is done. Model structs load through [`Scope`], whose
//! prefixes follow the checkpoint's name tree (`model.layers.3.self_attn.qkv_proj…`).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Called with (bytes loaded so far, total bytes of the checkpoint).
pub type ProgressFn = Box<dyn Fn(u64, u64)>;

/// An open checkpoint (one or more safetensors shards).
pub struct Weights {
    st: MmapedSafetensors,
    device: Device,
    used: RefCell<BTreeSet<String>>,
    loaded_bytes: RefCell<u64>,
    total_bytes: u64,
    progress: Option<ProgressFn>,
}

impl Weights {
    /// Memory-maps the shards and parses their headers.
    pub fn open(paths: &[PathBuf], device: &Device) -> Result<Self> {
        for p in paths {
            check_header(p)?;
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them
        // not being truncated while the model is loading.
        let st = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::Checkpoint {
            path: paths.first().cloned().unwrap_or_default(),
            message: e.to_string(),
        })?;
        let total_bytes = st.tensors().iter().map(|(_, v)| v.data().len() as u64).sum();
        Ok(Weights {
            st,
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
        self.st.get(name).is_ok()
    }

    /// Loads `name`, checks its shape and converts it to `dtype`.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let view = self
            .st
            .get(name)
            .map_err(|_| Error::MissingTensor(name.to_string()))?;
        if view.shape() != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        use safetensors::Dtype as S;
        if !matches!(view.dtype(), S::BF16 | S::F16 | S::F32) {
            return Err(Error::TensorDtype {
                name: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let bytes = view.data().len() as u64;
        let t = self.st.load(name, &self.device)?.to_dtype(dtype)?;
        self.used.borrow_mut().insert(name.to_string());
        let done = {
            let mut lb = self.loaded_bytes.borrow_mut();
            *lb += bytes;
            *lb
        };
        if let Some(p) = &self.progress {
            p(done, self.total_bytes);
        }
        Ok(t)
    }

    /// Names present in the checkpoint that nothing loaded.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.st
            .tensors()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !used.contains(n))
            .collect()
    }

    /// Total bytes of tensor data in the checkpoint.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
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

//! A preallocated key/value cache written at explicit positions (gpt-fast style): one
//! `[kv_heads, capacity, head_dim]` buffer per layer for keys (post-RoPE) and one for values.
//! It also remembers whether its keys were rotated with the long LongRoPE factors, so the engine
//! knows when the reference would drop it and re-prefill (spec §2.5).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Keys and values of every layer for one sequence.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    long: bool,
}

impl KvCache {
    /// Allocates room for `capacity` positions in each of `num_layers` layers.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            let k = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
            let v = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
            layers.push((k, v));
        }
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            long: false,
        })
    }

    /// Number of positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the cached keys carry the long-factor rotation.
    pub fn is_long(&self) -> bool {
        self.long
    }

    /// Forgets every position (the buffers stay allocated) and records the rotation mode the
    /// next prefill will use.
    pub fn reset(&mut self, long: bool) {
        self.len = 0;
        self.long = long;
    }

    /// Writes `k`, `v` `[kv_heads, n, head_dim]` of `layer` at positions `start..start+n` and
    /// returns the cached keys and values `[kv_heads, start+n, head_dim]`.
    pub fn append(
        &mut self,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if start + n > self.capacity {
            return Err(Error::Request(format!(
                "KV cache holds {} positions; cannot write {}..{}",
                self.capacity,
                start,
                start + n
            )));
        }
        let (kc, vc) = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Request(format!("KV cache has no layer {layer}")))?;
        kc.slice_set(&k.contiguous()?, 1, start)?;
        vc.slice_set(&v.contiguous()?, 1, start)?;
        let end = start + n;
        Ok((kc.narrow(1, 0, end)?, vc.narrow(1, 0, end)?))
    }

    /// Marks positions `..len` as filled (after every layer has appended).
    pub fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

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

    /// Makes room for at least `needed` positions, growing by doubling (up to `limit`) and
    /// copying what is cached. Generation reserves a little ahead, so a large
    /// `max_new_tokens` does not allocate its whole cache up front.
    pub fn reserve(&mut self, needed: usize, limit: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).min(limit.max(needed));
        let len = self.len;
        for (k, v) in self.layers.iter_mut() {
            let (kv_heads, _, head_dim) = k.dims3()?;
            let grow = |old: &Tensor| -> Result<Tensor> {
                let t = Tensor::zeros((kv_heads, new_cap, head_dim), old.dtype(), old.device())?;
                if len > 0 {
                    t.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
                Ok(t)
            };
            *k = grow(k)?;
            *v = grow(v)?;
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Marks positions `..len` as filled (after every layer has appended).
    pub fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_keeps_cached_positions() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 2, 3, 4, DType::F32, &dev)?;
        let k = Tensor::arange(0f32, 24.0, &dev)?.reshape((2, 4, 3))?;
        let v = (&k * 2.0)?;
        for layer in 0..2 {
            c.append(layer, 0, &k, &v)?;
        }
        c.set_len(4);
        assert!(c.append(0, 4, &k.narrow(1, 0, 1)?, &v.narrow(1, 0, 1)?).is_err());
        c.reserve(5, 100)?;
        assert_eq!(c.capacity(), 8);
        let (k2, v2) = c.append(1, 4, &k.narrow(1, 0, 1)?, &v.narrow(1, 0, 1)?)?;
        assert_eq!(k2.narrow(1, 0, 4)?.to_vec3::<f32>()?, k.to_vec3::<f32>()?);
        assert_eq!(v2.narrow(1, 0, 4)?.to_vec3::<f32>()?, v.to_vec3::<f32>()?);
        c.reserve(50, 20)?;
        assert_eq!(c.capacity(), 50, "the limit never stops a needed reservation");
        Ok(())
    }
}

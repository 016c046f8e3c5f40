//! A preallocated key/value cache written at explicit positions (gpt-fast style): per layer a
//! `[kv_heads, capacity, head_dim]` buffer for keys (post-RoPE) and one for values. It also
//! remembers whether its keys were rotated with the long LongRoPE factors, so the engine knows
//! when the reference would drop it and re-prefill (spec §2.5).
//!
//! Two formats: dense in the activation dtype (bf16 by default), or 8-bit — each key and value
//! vector of one head at one position stored as int8 with its own f32 scale (`max|x| / 127`),
//! half the memory of bf16 (the full 131072-token context: 8.3 GiB instead of 16 GiB).
//! Single-token decode attends over the 8-bit cache directly ([`KvCache::attend`]); a prefill
//! chunk reads it dequantised.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvFormat {
    /// The activation dtype.
    #[default]
    Dense,
    /// int8 with one f32 scale per head and position (CPU).
    Q8,
}

impl KvFormat {
    /// `auto`/`bf16`/`f16`/`f32` (dense, the activation dtype) or `q8`/`q8_0`/`int8`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "" | "auto" | "dense" | "bf16" | "f16" | "f32" => Ok(KvFormat::Dense),
            "q8" | "q8_0" | "int8" | "i8" => Ok(KvFormat::Q8),
            other => Err(Error::Request(format!("unknown KV cache format `{other}` (use auto or q8)"))),
        }
    }
}

/// One layer of the 8-bit cache.
#[derive(Debug, Default)]
struct Q8Layer {
    k: Vec<i8>,  // [kv_heads, capacity, head_dim]
    ks: Vec<f32>, // [kv_heads, capacity]
    v: Vec<i8>,
    vs: Vec<f32>,
}

#[derive(Debug)]
enum Store {
    Dense(Vec<(Tensor, Tensor)>),
    Q8(Vec<Q8Layer>),
}

/// Keys and values of every layer for one sequence.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    len: usize,
    capacity: usize,
    long: bool,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
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
        Self::with_format(num_layers, kv_heads, head_dim, capacity, dtype, KvFormat::Dense, device)
    }

    /// [`KvCache::new`] in a given format (8-bit needs the CPU).
    pub fn with_format(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        format: KvFormat,
        device: &Device,
    ) -> Result<Self> {
        let store = match format {
            KvFormat::Dense => {
                let mut layers = Vec::with_capacity(num_layers);
                for _ in 0..num_layers {
                    let k = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                    let v = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                    layers.push((k, v));
                }
                Store::Dense(layers)
            }
            KvFormat::Q8 => {
                if !device.is_cpu() {
                    return Err(Error::Request("the 8-bit KV cache runs on the CPU only".into()));
                }
                let layers = (0..num_layers)
                    .map(|_| Q8Layer {
                        k: vec![0; kv_heads * capacity * head_dim],
                        ks: vec![0.0; kv_heads * capacity],
                        v: vec![0; kv_heads * capacity * head_dim],
                        vs: vec![0.0; kv_heads * capacity],
                    })
                    .collect();
                Store::Q8(layers)
            }
        };
        Ok(KvCache { store, len: 0, capacity, long: false, kv_heads, head_dim, device: device.clone() })
    }

    /// The storage format.
    pub fn format(&self) -> KvFormat {
        match self.store {
            Store::Dense(_) => KvFormat::Dense,
            Store::Q8(_) => KvFormat::Q8,
        }
    }

    /// Bytes held by the buffers.
    pub fn nbytes(&self) -> usize {
        match &self.store {
            Store::Dense(l) => l.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum(),
            Store::Q8(l) => l.iter().map(|q| q.k.len() + q.v.len() + 4 * (q.ks.len() + q.vs.len())).sum(),
        }
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
    /// returns the cached keys and values `[kv_heads, start+n, head_dim]` (8-bit: dequantised
    /// to f32).
    pub fn append(
        &mut self,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.write(layer, start, k, v)?;
        let end = start + k.dim(1)?;
        match &self.store {
            Store::Dense(layers) => {
                let (kc, vc) = &layers[layer];
                Ok((kc.narrow(1, 0, end)?, vc.narrow(1, 0, end)?))
            }
            Store::Q8(layers) => {
                let q = &layers[layer];
                let (h, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
                let deq = |x: &[i8], s: &[f32]| -> Result<Tensor> {
                    let mut out = vec![0f32; h * end * d];
                    for head in 0..h {
                        for p in 0..end {
                            let src = &x[(head * cap + p) * d..(head * cap + p + 1) * d];
                            let sc = s[head * cap + p];
                            for (o, &x) in out[(head * end + p) * d..(head * end + p + 1) * d].iter_mut().zip(src) {
                                *o = x as f32 * sc;
                            }
                        }
                    }
                    Ok(Tensor::from_vec(out, (h, end, d), &self.device)?)
                };
                Ok((deq(&q.k, &q.ks)?, deq(&q.v, &q.vs)?))
            }
        }
    }

    /// Writes `k`, `v` `[kv_heads, n, head_dim]` of `layer` at positions `start..start+n`.
    pub fn write(&mut self, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(1)?;
        if start + n > self.capacity {
            return Err(Error::Request(format!(
                "KV cache holds {} positions; cannot write {}..{}",
                self.capacity,
                start,
                start + n
            )));
        }
        let (d, cap) = (self.head_dim, self.capacity);
        match &mut self.store {
            Store::Dense(layers) => {
                let (kc, vc) = layers
                    .get(layer)
                    .ok_or_else(|| Error::Request(format!("KV cache has no layer {layer}")))?;
                kc.slice_set(&k.contiguous()?, 1, start)?;
                vc.slice_set(&v.contiguous()?, 1, start)?;
            }
            Store::Q8(layers) => {
                let q = layers
                    .get_mut(layer)
                    .ok_or_else(|| Error::Request(format!("KV cache has no layer {layer}")))?;
                let kf: Vec<f32> = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let vf: Vec<f32> = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                for (src, dst, scales) in [(&kf, &mut q.k, &mut q.ks), (&vf, &mut q.v, &mut q.vs)] {
                    for (i, row) in src.chunks(d).enumerate() {
                        let (head, p) = (i / n, start + i % n);
                        let at = head * cap + p;
                        scales[at] = crate::quant::quantize_i8(row, &mut dst[at * d..(at + 1) * d]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether [`KvCache::attend`] works on this cache (CPU, f32/bf16/8-bit).
    pub fn can_attend(&self) -> bool {
        match &self.store {
            Store::Q8(_) => true,
            Store::Dense(l) => l.first().is_some_and(|(k, _)| k.device().is_cpu() && matches!(k.dtype(), DType::F32 | DType::BF16)),
        }
    }

    /// Single-query attention over positions `0..len` of `layer`, reading the cache in place:
    /// `q` `[heads, head_dim]` (f32, heads grouped under KV heads in order) →
    /// `[heads, head_dim]` f32. Softmax in f32; no mask (every cached position precedes the
    /// query).
    pub fn attend(&self, layer: usize, q: &[f32], heads: usize, len: usize, scale: f32) -> Result<Vec<f32>> {
        let missing = || Error::Request(format!("KV cache has no layer {layer}"));
        match &self.store {
            Store::Q8(layers) => {
                let c = layers.get(layer).ok_or_else(missing)?;
                Ok(self.attend_with(q, heads, len, scale, (&c.k, Some(&c.ks)), (&c.v, Some(&c.vs)), |x: i8| x as f32))
            }
            Store::Dense(layers) => {
                let (k, v) = layers.get(layer).ok_or_else(missing)?;
                let (ks, kl) = k.storage_and_layout();
                let (vs, vl) = v.storage_and_layout();
                let n = self.kv_heads * self.capacity * self.head_dim;
                let (ko, vo) = (kl.start_offset(), vl.start_offset());
                use candle_core::{CpuStorage, Storage};
                match (&*ks, &*vs) {
                    (Storage::Cpu(CpuStorage::BF16(kd)), Storage::Cpu(CpuStorage::BF16(vd))) => Ok(self.attend_with(
                        q, heads, len, scale,
                        (&kd[ko..ko + n], None),
                        (&vd[vo..vo + n], None),
                        |x: half::bf16| f32::from_bits((x.to_bits() as u32) << 16),
                    )),
                    (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) => {
                        Ok(self.attend_with(q, heads, len, scale, (&kd[ko..ko + n], None), (&vd[vo..vo + n], None), |x: f32| x))
                    }
                    _ => Err(Error::Request("direct attention needs an f32, bf16 or 8-bit cache on the CPU".into())),
                }
            }
        }
    }

    /// [`KvCache::attend`] over `[kv_heads, capacity, head_dim]` keys and values of any element
    /// type (`to_f32` widens one; optional per-position scales for the 8-bit cache).
    #[allow(clippy::too_many_arguments)]
    fn attend_with<T: Copy + Sync>(
        &self,
        q: &[f32],
        heads: usize,
        len: usize,
        scale: f32,
        (k, ks): (&[T], Option<&Vec<f32>>),
        (v, vs): (&[T], Option<&Vec<f32>>),
        to_f32: impl Fn(T) -> f32 + Sync,
    ) -> Vec<f32> {
        let (kvh, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
        let group = (heads / kvh.max(1)).max(1);
        let mut out = vec![0f32; heads * d];
        out.par_chunks_mut(d).enumerate().for_each(|(h, o)| {
            let kv = h / group;
            let qh = &q[h * d..(h + 1) * d];
            let mut scores: Vec<f32> = (0..len)
                .map(|p| {
                    let at = kv * cap + p;
                    let row = &k[at * d..(at + 1) * d];
                    let mut acc = [0f32; 16];
                    for (qc, kc) in qh.chunks_exact(16).zip(row.chunks_exact(16)) {
                        for i in 0..16 {
                            acc[i] += qc[i] * to_f32(kc[i]);
                        }
                    }
                    let mut s: f32 = acc.iter().sum();
                    for i in d / 16 * 16..d {
                        s += qh[i] * to_f32(row[i]);
                    }
                    s * ks.map_or(1.0, |ks| ks[at]) * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (p, &w) in scores.iter().enumerate() {
                let at = kv * cap + p;
                let f = w / sum * vs.map_or(1.0, |vs| vs[at]);
                for (o, &x) in o.iter_mut().zip(&v[at * d..(at + 1) * d]) {
                    *o += f * to_f32(x);
                }
            }
        });
        out
    }

    /// Makes room for at least `needed` positions, growing by doubling (up to `limit`) and
    /// copying what is cached. Generation reserves a little ahead, so a large
    /// `max_new_tokens` does not allocate its whole cache up front.
    pub fn reserve(&mut self, needed: usize, limit: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).min(limit.max(needed));
        let (len, old_cap, h, d) = (self.len, self.capacity, self.kv_heads, self.head_dim);
        match &mut self.store {
            Store::Dense(layers) => {
                for (k, v) in layers.iter_mut() {
                    let grow = |old: &Tensor| -> Result<Tensor> {
                        let t = Tensor::zeros((h, new_cap, d), old.dtype(), old.device())?;
                        if len > 0 {
                            t.slice_set(&old.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                        }
                        Ok(t)
                    };
                    *k = grow(k)?;
                    *v = grow(v)?;
                }
            }
            Store::Q8(layers) => {
                for q in layers.iter_mut() {
                    for (x, s) in [(&mut q.k, &mut q.ks), (&mut q.v, &mut q.vs)] {
                        let mut nx = vec![0i8; h * new_cap * d];
                        let mut ns = vec![0f32; h * new_cap];
                        for head in 0..h {
                            nx[head * new_cap * d..(head * new_cap + len) * d]
                                .copy_from_slice(&x[head * old_cap * d..(head * old_cap + len) * d]);
                            ns[head * new_cap..head * new_cap + len].copy_from_slice(&s[head * old_cap..head * old_cap + len]);
                        }
                        *x = nx;
                        *s = ns;
                    }
                }
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// Fills positions `len()..target` by repeating the cached ones and marks the cache as
    /// rotated with `long` factors. Only for measuring memory and decode speed at long context
    /// (`phi4mm bench --context`): the contents are not what a real prefill would cache.
    pub fn repeat_to(&mut self, target: usize, long: bool) -> Result<()> {
        let have = self.len;
        if have == 0 || target > self.capacity {
            return Err(Error::Request(format!("cannot repeat {have} cached positions to {target} (capacity {})", self.capacity)));
        }
        let (h, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
        match &mut self.store {
            Store::Dense(layers) => {
                for (k, v) in layers.iter() {
                    let mut at = have;
                    while at < target {
                        let n = have.min(target - at);
                        k.slice_set(&k.narrow(1, 0, n)?.contiguous()?, 1, at)?;
                        v.slice_set(&v.narrow(1, 0, n)?.contiguous()?, 1, at)?;
                        at += n;
                    }
                }
            }
            Store::Q8(layers) => {
                for q in layers.iter_mut() {
                    for (x, s) in [(&mut q.k, &mut q.ks), (&mut q.v, &mut q.vs)] {
                        for head in 0..h {
                            for p in have..target {
                                let from = head * cap + p % have;
                                let to = head * cap + p;
                                x.copy_within(from * d..(from + 1) * d, to * d);
                                s[to] = s[from];
                            }
                        }
                    }
                }
            }
        }
        self.len = target;
        self.long = long;
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

    #[test]
    fn eight_bit_cache_attends_like_the_dequantised_reference() -> Result<()> {
        let dev = Device::Cpu;
        let (kvh, d, heads, len) = (2, 16, 6, 9);
        let mut c = KvCache::with_format(1, kvh, d, 4, DType::F32, KvFormat::Q8, &dev)?;
        let k = Tensor::randn(0f32, 1.0, (kvh, len, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (kvh, len, d), &dev)?;
        c.reserve(len, 64)?;
        // Prefill 5 positions, then grow and append 4 one at a time.
        let (k5, _) = c.append(0, 0, &k.narrow(1, 0, 5)?, &v.narrow(1, 0, 5)?)?;
        c.set_len(5);
        let kf: Vec<f32> = k.narrow(1, 0, 5)?.flatten_all()?.to_vec1()?;
        for (a, b) in k5.flatten_all()?.to_vec1::<f32>()?.iter().zip(&kf) {
            assert!((a - b).abs() <= 4.0 / 127.0, "{a} vs {b}");
        }
        for p in 5..len {
            c.write(0, p, &k.narrow(1, p, 1)?, &v.narrow(1, p, 1)?)?;
            c.set_len(p + 1);
        }
        let (kd, vd) = c.append(0, len - 1, &k.narrow(1, len - 1, 1)?, &v.narrow(1, len - 1, 1)?)?;
        let q = Tensor::randn(0f32, 1.0, (heads, d), &dev)?;
        let got = c.attend(0, &q.flatten_all()?.to_vec1()?, heads, len, 0.25)?;
        // Reference: softmax(q·kᵀ·s)·v with the dequantised cache, head h under KV head h / 3.
        let qg = q.reshape((kvh, heads / kvh, d))?;
        let p = candle_nn::ops::softmax_last_dim(&(qg.matmul(&kd.t()?)? * 0.25)?)?;
        let want: Vec<f32> = p.matmul(&vd)?.flatten_all()?.to_vec1()?;
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
        }
        let cap = c.capacity();
        assert_eq!(c.nbytes(), 2 * (kvh * cap * d + 4 * kvh * cap));
        Ok(())
    }
}

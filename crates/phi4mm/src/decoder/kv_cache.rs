//! A preallocated key/value cache written at explicit positions (gpt-fast style): per layer a
//! `[kv_heads, capacity, head_dim]` buffer for keys (post-RoPE) and one for values. It also
//! remembers whether its keys were rotated with the long LongRoPE factors, so the engine knows
//! when the reference would drop it and re-prefill (spec §2.5).
//!
//! On the CPU the buffers are plain vectors: f32 or bf16 (the activation dtype), or 8-bit —
//! each key and value vector of one head at one position stored as int8 with its own f32 scale
//! (`max|x| / 127`), half the memory of bf16 (the full 131072-token context: 8.3 GiB instead of
//! 16 GiB). Single-token decode writes and attends over them in place ([`KvCache::write_row`],
//! [`KvCache::attend_into`]); a prefill chunk reads them widened to f32. Other devices and
//! dtypes keep tensors.

use candle_core::{DType, Device, Tensor};
use half::bf16;

use crate::error::{Error, Result};
use crate::kernels::attend::{attend, Buffer, Query};

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

/// The elements of one host buffer `[kv_heads, capacity, head_dim]`.
#[derive(Debug)]
enum Elems {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// With one scale per head and position, `[kv_heads, capacity]`.
    I8(Vec<i8>, Vec<f32>),
}

/// Runs `$body` with `$v` bound to the element vector of `$e` (any variant).
macro_rules! each_elems {
    ($e:expr, $v:ident => $body:expr) => {
        match $e {
            Elems::F32($v) => $body,
            Elems::Bf16($v) => $body,
            Elems::I8($v, _) => $body,
        }
    };
}

/// Moves the first `len` positions of every head from a `[heads, old, per]` layout to a
/// `[heads, new, per]` one (`per` values per position).
fn regrow<T: Copy + Default>(x: &mut Vec<T>, heads: usize, per: usize, old: usize, new: usize, len: usize) {
    let mut nx = vec![T::default(); heads * new * per];
    for h in 0..heads {
        nx[h * new * per..(h * new + len) * per].copy_from_slice(&x[h * old * per..(h * old + len) * per]);
    }
    *x = nx;
}

/// Copies positions `p % have` to `p` for `p` in `have..target`, every head.
fn repeat<T: Copy>(x: &mut [T], heads: usize, per: usize, cap: usize, have: usize, target: usize) {
    for h in 0..heads {
        for p in have..target {
            let from = (h * cap + p % have) * per;
            x.copy_within(from..from + per, (h * cap + p) * per);
        }
    }
}

impl Elems {
    fn zeros(dtype: DType, format: KvFormat, n: usize, positions: usize) -> Result<Self> {
        Ok(match (format, dtype) {
            (KvFormat::Q8, _) => Elems::I8(vec![0; n], vec![0.0; positions]),
            (KvFormat::Dense, DType::F32) => Elems::F32(vec![0.0; n]),
            (KvFormat::Dense, DType::BF16) => Elems::Bf16(vec![bf16::ZERO; n]),
            (_, other) => return Err(Error::Request(format!("no host KV cache for {other:?}"))),
        })
    }

    fn nbytes(&self) -> usize {
        match self {
            Elems::F32(v) => 4 * v.len(),
            Elems::Bf16(v) => 2 * v.len(),
            Elems::I8(v, s) => v.len() + 4 * s.len(),
        }
    }

    /// The positions of `span` in a new buffer of `span.to_cap` positions.
    fn copy_span(&self, span: &Span, d: usize) -> Elems {
        fn take<T: Copy + Default>(x: &[T], span: &Span, per: usize) -> Vec<T> {
            let mut out = vec![T::default(); span.heads * span.to_cap * per];
            span.copy(x, &mut out, per);
            out
        }
        match self {
            Elems::F32(v) => Elems::F32(take(v, span, d)),
            Elems::Bf16(v) => Elems::Bf16(take(v, span, d)),
            Elems::I8(v, s) => Elems::I8(take(v, span, d), take(s, span, 1)),
        }
    }

    /// Writes the positions of `span` from `src` (same variant; `None` if it is not).
    fn paste_span(&mut self, src: &Elems, span: &Span, d: usize) -> Option<()> {
        match (self, src) {
            (Elems::F32(to), Elems::F32(from)) => span.copy(from, to, d),
            (Elems::Bf16(to), Elems::Bf16(from)) => span.copy(from, to, d),
            (Elems::I8(to, ts), Elems::I8(from, fs)) => {
                span.copy(from, to, d);
                span.copy(fs, ts, 1);
            }
            _ => return None,
        }
        Some(())
    }

    /// Stores `x` (`head_dim` values) at slot `at` (= head·capacity + position).
    fn store(&mut self, at: usize, x: &[f32]) {
        let d = x.len();
        match self {
            Elems::F32(v) => v[at * d..(at + 1) * d].copy_from_slice(x),
            Elems::Bf16(v) => {
                for (o, &x) in v[at * d..(at + 1) * d].iter_mut().zip(x) {
                    *o = bf16::from_f32(x);
                }
            }
            Elems::I8(v, s) => s[at] = crate::model::quant::quantize_i8(x, &mut v[at * d..(at + 1) * d]),
        }
    }

    /// Slot `at` widened to f32 into `out` (`head_dim` values).
    fn load(&self, at: usize, out: &mut [f32]) {
        let d = out.len();
        match self {
            Elems::F32(v) => out.copy_from_slice(&v[at * d..(at + 1) * d]),
            Elems::Bf16(v) => {
                for (o, x) in out.iter_mut().zip(&v[at * d..(at + 1) * d]) {
                    *o = x.to_f32();
                }
            }
            Elems::I8(v, s) => {
                for (o, &x) in out.iter_mut().zip(&v[at * d..(at + 1) * d]) {
                    *o = x as f32 * s[at];
                }
            }
        }
    }
}

#[derive(Debug)]
enum Store {
    /// Tensors in the activation dtype (non-CPU devices, other dtypes).
    Tensors(Vec<(Tensor, Tensor)>),
    /// CPU vectors, keys and values per layer.
    Host(Vec<(Elems, Elems)>),
}

impl Store {
    fn nbytes(&self) -> usize {
        match self {
            Store::Tensors(l) => l.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum(),
            Store::Host(l) => l.iter().map(|(k, v)| k.nbytes() + v.nbytes()).sum(),
        }
    }
}

/// Keys and values of some consecutive positions of every layer, copied out of a cache
/// ([`KvCache::export`]) to be written into another one ([`KvCache::import`]).
#[derive(Debug)]
pub struct KvBlock {
    store: Store,
    len: usize,
}

impl KvBlock {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.store.nbytes()
    }
}

/// `n` positions of every head, from position `from` of a `[heads, from_cap, ·]` buffer to
/// position `to` of a `[heads, to_cap, ·]` one.
struct Span {
    heads: usize,
    from_cap: usize,
    from: usize,
    to_cap: usize,
    to: usize,
    n: usize,
}

impl Span {
    fn copy<T: Copy>(&self, src: &[T], dst: &mut [T], per: usize) {
        for h in 0..self.heads {
            let (a, b) = ((h * self.from_cap + self.from) * per, (h * self.to_cap + self.to) * per);
            dst[b..b + self.n * per].copy_from_slice(&src[a..a + self.n * per]);
        }
    }
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
        let host = device.is_cpu() && (format == KvFormat::Q8 || matches!(dtype, DType::F32 | DType::BF16));
        let store = if host {
            let (n, positions) = (kv_heads * capacity * head_dim, kv_heads * capacity);
            let mut layers = Vec::with_capacity(num_layers);
            for _ in 0..num_layers {
                layers.push((
                    Elems::zeros(dtype, format, n, positions)?,
                    Elems::zeros(dtype, format, n, positions)?,
                ));
            }
            Store::Host(layers)
        } else if format == KvFormat::Q8 {
            return Err(Error::Request("the 8-bit KV cache runs on the CPU only".into()));
        } else {
            let mut layers = Vec::with_capacity(num_layers);
            for _ in 0..num_layers {
                let k = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                let v = Tensor::zeros((kv_heads, capacity, head_dim), dtype, device)?;
                layers.push((k, v));
            }
            Store::Tensors(layers)
        };
        Ok(KvCache { store, len: 0, capacity, long: false, kv_heads, head_dim, device: device.clone() })
    }

    /// The storage format.
    pub fn format(&self) -> KvFormat {
        match &self.store {
            Store::Host(l) if matches!(l.first(), Some((Elems::I8(..), _))) => KvFormat::Q8,
            _ => KvFormat::Dense,
        }
    }

    /// Bytes held by the buffers.
    pub fn nbytes(&self) -> usize {
        self.store.nbytes()
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
    /// returns the cached keys and values `[kv_heads, start+n, head_dim]` (f32 on the CPU, the
    /// activation dtype elsewhere).
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
            Store::Tensors(layers) => {
                let (kc, vc) = &layers[layer];
                Ok((kc.narrow(1, 0, end)?, vc.narrow(1, 0, end)?))
            }
            Store::Host(layers) => {
                let (h, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
                let widen = |x: &Elems| -> Result<Tensor> {
                    let mut out = vec![0f32; h * end * d];
                    for (i, o) in out.chunks_mut(d).enumerate() {
                        x.load((i / end) * cap + i % end, o);
                    }
                    Ok(Tensor::from_vec(out, (h, end, d), &self.device)?)
                };
                let (kc, vc) = &layers[layer];
                Ok((widen(kc)?, widen(vc)?))
            }
        }
    }

    /// Writes `k`, `v` `[kv_heads, n, head_dim]` of `layer` at positions `start..start+n`.
    pub fn write(&mut self, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(1)?;
        self.check(layer, start, n)?;
        match &mut self.store {
            Store::Tensors(layers) => {
                let (kc, vc) = &layers[layer];
                kc.slice_set(&k.contiguous()?, 1, start)?;
                vc.slice_set(&v.contiguous()?, 1, start)?;
            }
            Store::Host(layers) => {
                let (d, cap) = (self.head_dim, self.capacity);
                let (kc, vc) = &mut layers[layer];
                for (src, dst) in [(k, kc), (v, vc)] {
                    let x: Vec<f32> = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    for (i, row) in x.chunks(d).enumerate() {
                        dst.store((i / n) * cap + start + i % n, row);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes one position's keys and values, `[kv_heads, head_dim]` each (f32; CPU caches).
    pub fn write_row(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) -> Result<()> {
        self.check(layer, pos, 1)?;
        let (d, cap) = (self.head_dim, self.capacity);
        let Store::Host(layers) = &mut self.store else {
            return Err(Error::Request("direct cache writes need a CPU cache".into()));
        };
        let (kc, vc) = &mut layers[layer];
        for (h, (kr, vr)) in k.chunks(d).zip(v.chunks(d)).enumerate() {
            kc.store(h * cap + pos, kr);
            vc.store(h * cap + pos, vr);
        }
        Ok(())
    }

    fn check(&self, layer: usize, start: usize, n: usize) -> Result<()> {
        let layers = match &self.store {
            Store::Tensors(l) => l.len(),
            Store::Host(l) => l.len(),
        };
        if layer >= layers {
            return Err(Error::Request(format!("KV cache has no layer {layer}")));
        }
        if start + n > self.capacity {
            return Err(Error::Request(format!(
                "KV cache holds {} positions; cannot write {}..{}",
                self.capacity,
                start,
                start + n
            )));
        }
        Ok(())
    }

    /// Whether [`KvCache::attend`] and [`KvCache::write_row`] work on this cache (CPU).
    pub fn can_attend(&self) -> bool {
        matches!(self.store, Store::Host(_))
    }

    /// [`KvCache::attend_into`] into a new vector.
    pub fn attend(&self, layer: usize, q: &[f32], heads: usize, len: usize, scale: f32) -> Result<Vec<f32>> {
        let mut out = vec![0f32; heads * self.head_dim];
        self.attend_into(layer, q, heads, len, scale, &mut out)?;
        Ok(out)
    }

    /// Single-query attention over positions `0..len` of `layer`, reading the cache in place:
    /// `q` `[heads, head_dim]` (f32, heads grouped under KV heads in order) → `out`
    /// `[heads, head_dim]`. Softmax in f32; no mask (every cached position precedes the
    /// query). Tasks are KV heads × splits of the positions (`kernels::attend`).
    pub fn attend_into(
        &self,
        layer: usize,
        q: &[f32],
        heads: usize,
        len: usize,
        scale: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let Store::Host(layers) = &self.store else {
            return Err(Error::Request("direct attention needs a CPU cache".into()));
        };
        let (k, v) = layers.get(layer).ok_or_else(|| Error::Request(format!("KV cache has no layer {layer}")))?;
        if len == 0 || len > self.capacity || q.len() != heads * self.head_dim || out.len() != q.len() {
            return Err(Error::Request("attention over the cache: inconsistent sizes".into()));
        }
        let a = Query { q, heads, kv_heads: self.kv_heads, head_dim: self.head_dim, capacity: self.capacity, len, scale };
        match (k, v) {
            (Elems::F32(k), Elems::F32(v)) => attend(&a, Buffer::plain(k), Buffer::plain(v), out),
            (Elems::Bf16(k), Elems::Bf16(v)) => attend(&a, Buffer::plain(k), Buffer::plain(v), out),
            (Elems::I8(k, ks), Elems::I8(v, vs)) => {
                attend(&a, Buffer { elems: k, scales: Some(ks) }, Buffer { elems: v, scales: Some(vs) }, out)
            }
            _ => return Err(Error::Request("KV cache keys and values differ in format".into())),
        }
        Ok(())
    }

    /// Makes room for at least `needed` positions, growing by doubling (up to `limit`) and
    /// copying what is cached. Generation reserves a little ahead, so a large
    /// `max_new_tokens` does not allocate its whole cache up front.
    pub fn reserve(&mut self, needed: usize, limit: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).min(limit.max(needed));
        let (len, old, h, d) = (self.len, self.capacity, self.kv_heads, self.head_dim);
        match &mut self.store {
            Store::Tensors(layers) => {
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
            Store::Host(layers) => {
                for e in layers.iter_mut().flat_map(|(k, v)| [k, v]) {
                    each_elems!(&mut *e, x => regrow(x, h, d, old, new_cap, len));
                    if let Elems::I8(_, s) = e {
                        regrow(s, h, 1, old, new_cap, len);
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
            Store::Tensors(layers) => {
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
            Store::Host(layers) => {
                for e in layers.iter_mut().flat_map(|(k, v)| [k, v]) {
                    each_elems!(&mut *e, x => repeat(x, h, d, cap, have, target));
                    if let Elems::I8(_, s) = e {
                        repeat(s, h, 1, cap, have, target);
                    }
                }
            }
        }
        self.len = target;
        self.long = long;
        Ok(())
    }

    /// A copy of positions `start..start + n` of every layer (for the prefix cache).
    pub fn export(&self, start: usize, n: usize) -> Result<KvBlock> {
        if start + n > self.len {
            return Err(Error::Request(format!("cannot export positions {start}..{} of {} cached", start + n, self.len)));
        }
        let (h, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
        let store = match &self.store {
            Store::Tensors(l) => {
                let copy = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, start, n)?.contiguous()?.copy()?) };
                Store::Tensors(l.iter().map(|(k, v)| Ok((copy(k)?, copy(v)?))).collect::<Result<_>>()?)
            }
            Store::Host(l) => {
                let span = Span { heads: h, from_cap: cap, from: start, to_cap: n, to: 0, n };
                Store::Host(l.iter().map(|(k, v)| (k.copy_span(&span, d), v.copy_span(&span, d))).collect())
            }
        };
        Ok(KvBlock { store, len: n })
    }

    /// Writes `block` at positions `start..start + block.len()` and marks the cache filled to
    /// there (the rotation mode is the caller's: [`KvCache::reset`] first). The block must
    /// come from a cache of the same format.
    pub fn import(&mut self, start: usize, block: &KvBlock) -> Result<()> {
        let n = block.len;
        self.check(0, start, n)?;
        let (h, d, cap) = (self.kv_heads, self.head_dim, self.capacity);
        let mismatch = || Error::Request("a cached KV block differs from this cache in format or shape".into());
        match (&mut self.store, &block.store) {
            (Store::Tensors(to), Store::Tensors(from)) if to.len() == from.len() => {
                for ((kc, vc), (k, v)) in to.iter().zip(from) {
                    kc.slice_set(k, 1, start)?;
                    vc.slice_set(v, 1, start)?;
                }
            }
            (Store::Host(to), Store::Host(from)) if to.len() == from.len() => {
                let span = Span { heads: h, from_cap: n, from: 0, to_cap: cap, to: start, n };
                for ((kc, vc), (k, v)) in to.iter_mut().zip(from) {
                    kc.paste_span(k, &span, d).ok_or_else(mismatch)?;
                    vc.paste_span(v, &span, d).ok_or_else(mismatch)?;
                }
            }
            _ => return Err(mismatch()),
        }
        self.len = start + n;
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

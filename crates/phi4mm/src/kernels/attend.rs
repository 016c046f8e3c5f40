//! Single-query attention over one layer of the host KV cache (the decode step).
//!
//! Each task takes the query heads that share a KV head (up to four at once) and one split of
//! the cached positions, so every key and value is read from memory once per step however
//! many query heads use it, and long contexts spread over all the threads: scores
//! `q·k·scale` for its keys, a softmax partial (`max`, `Σ e^(s−max)`, `Σ e^(s−max)·v`), then
//! the splits are combined per head (the flash-decoding split). The keys and values are
//! prefetched ahead of use; the loops are written over 16 independent lanes and compiled
//! for AVX-512 and AVX2 as well as portably, and `exp` is [`super::elementwise::exp`].

use std::cell::RefCell;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::bf16;

use super::elementwise::exp;
use super::{prefetch, team, PREFETCH_AHEAD};

/// An element of a cache buffer.
pub(crate) trait Widen: Copy + Sync {
    fn widen(self) -> f32;

    /// 16 elements from `p`, widened.
    ///
    /// # Safety
    /// AVX-512F is present and `p` points at 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
    }
}

impl Widen for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
    }
}

/// One layer's keys or values, `[kv_heads, capacity, head_dim]`, with the 8-bit cache's
/// scale per slot (`[kv_heads, capacity]`).
#[derive(Clone, Copy)]
pub(crate) struct Buffer<'a, T> {
    pub elems: &'a [T],
    pub scales: Option<&'a [f32]>,
}

impl<'a, T> Buffer<'a, T> {
    /// A dense buffer (no scales).
    pub fn plain(elems: &'a [T]) -> Self {
        Buffer { elems, scales: None }
    }
}

/// What is attended: `q` `[heads, head_dim]` (heads grouped under the KV heads in order) over
/// positions `0..len` of buffers holding `capacity` positions per KV head.
pub(crate) struct Query<'a> {
    pub q: &'a [f32],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub len: usize,
    pub scale: f32,
}

/// Fewest positions a task takes when the keys are split.
const MIN_SPLIT: usize = 256;

thread_local! {
    /// A task's scores, reused across steps.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The caller's per-task partial results, reused across steps.
    static PARTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out` `[heads, head_dim]` = softmax(q·kᵀ·scale)·v per head (f32 softmax, no mask: every
/// cached position precedes the query). The caller checks the sizes.
pub(crate) fn attend<T: Widen>(a: &Query<'_>, k: Buffer<'_, T>, v: Buffer<'_, T>, out: &mut [f32]) {
    let d = a.head_dim;
    let group = (a.heads / a.kv_heads.max(1)).max(1);
    // Query heads per task: the largest of 4, 3, 2, 1 that divides the group.
    let g = (1..=4).rev().find(|&g| group.is_multiple_of(g)).unwrap_or(1);
    let head_sets = a.heads / g;
    let threads = rayon::current_num_threads().max(1);
    let splits = (4 * threads).div_ceil(head_sets).min(a.len.div_ceil(MIN_SPLIT)).max(1);
    let per = a.len.div_ceil(splits);
    // Per task and head: max, sum, then head_dim partial output values.
    let part = d + 2;
    PARTS.with(|cell| {
        // A call nested on this thread (rayon may run another job here while it waits) gets
        // its own buffer instead of a borrow panic.
        let mut own = Vec::new();
        let mut held = cell.try_borrow_mut().ok();
        let parts = held.as_deref_mut().unwrap_or(&mut own);
        parts.resize(head_sets * splits * g * part, 0.0);
        team::parallel_chunks(&mut parts[..], g * part, |t, chunk| {
            let (set, split) = (t / splits, t % splits);
            let first = split * per;
            let keys = first..(first + per).min(a.len);
            let task = Task { a, k, v, head0: set * g, kv: set * g / group, keys };
            match g {
                4 => task.run::<4>(chunk),
                3 => task.run::<3>(chunk),
                2 => task.run::<2>(chunk),
                _ => task.run::<1>(chunk),
            }
        });
        for (h, o) in out.chunks_mut(d).enumerate() {
            let (set, j) = (h / g, h % g);
            let of = |s: usize| &parts[((set * splits + s) * g + j) * part..][..part];
            let max = (0..splits).map(|s| of(s)[0]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            o.fill(0.0);
            for s in 0..splits {
                let p = of(s);
                // An empty split has max −∞ and weight 0; a NaN score stays NaN.
                let w = exp(p[0] - max);
                sum += w * p[1];
                o.iter_mut().zip(&p[2..]).for_each(|(o, x)| *o += w * x);
            }
            o.iter_mut().for_each(|x| *x /= sum);
        }
    });
}

/// One task: query heads `head0..head0+G` (all under KV head `kv`) over positions `keys`.
struct Task<'a, T> {
    a: &'a Query<'a>,
    k: Buffer<'a, T>,
    v: Buffer<'a, T>,
    head0: usize,
    kv: usize,
    keys: std::ops::Range<usize>,
}

impl<'a, T: Widen> Task<'a, T> {
    /// Position `p`'s row of `buf` (prefetching the rows ahead of it) and its scale (1 for a
    /// dense buffer).
    #[inline(always)]
    fn slot(&self, buf: Buffer<'a, T>, p: usize) -> (&'a [T], f32) {
        let d = self.a.head_dim;
        let at = self.kv * self.a.capacity + p;
        let row = &buf.elems[at * d..(at + 1) * d];
        prefetch_row(row);
        let scale = match buf.scales {
            Some(s) => s[at],
            None => 1.0,
        };
        (row, scale)
    }

    /// Writes per head `[max, Σ e^(s−max), Σ e^(s−max)·v …]` into `out`, on the widest SIMD
    /// the CPU has.
    fn run<const G: usize>(&self, out: &mut [f32]) {
        SCORES.with(|cell| {
            let mut own = Vec::new();
            let mut held = cell.try_borrow_mut().ok();
            let sc = held.as_deref_mut().unwrap_or(&mut own);
            sc.resize(G * self.keys.len(), 0.0);
            #[cfg(target_arch = "x86_64")]
            {
                if super::cpu::cpu().avx512f {
                    // SAFETY: the feature was just detected.
                    return unsafe { self.avx512::<G>(sc, out) };
                }
                if super::cpu::cpu().avx2 {
                    // SAFETY: the features were just detected.
                    return unsafe { self.avx2::<G>(sc, out) };
                }
            }
            self.lanes::<G, false>(sc, out)
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const G: usize>(&self, sc: &mut [f32], out: &mut [f32]) {
        let (a, d) = (self.a, self.a.head_dim);
        let (n, tail) = (self.keys.len(), d / 16 * 16);
        let q = &a.q[self.head0 * d..(self.head0 + G) * d];
        for (i, p) in self.keys.clone().enumerate() {
            let (row, ks) = self.slot(self.k, p);
            let mut acc = [_mm512_setzero_ps(); G];
            for c in (0..tail).step_by(16) {
                let kv = T::load16(row.as_ptr().add(c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(j * d + c)), kv, *acc);
                }
            }
            let s = a.scale * ks;
            for (j, acc) in acc.iter().enumerate() {
                let mut dot = _mm512_reduce_add_ps(*acc);
                for t in tail..d {
                    dot += q[j * d + t] * row[t].widen();
                }
                sc[j * n + i] = dot * s;
            }
        }
        self.softmax_partials::<G>(sc, out);
        if d == 128 && G <= 3 {
            self.values_in_registers::<G>(sc, out)
        } else {
            self.values_lanes::<G, true>(sc, out)
        }
    }

    /// `Σ e^(s−max)·v` for head_dim 128 and up to three heads: the 8·G sums stay in
    /// registers over all the keys (through memory, each key's update waited on the last).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn values_in_registers<const G: usize>(&self, sc: &[f32], out: &mut [f32]) {
        let n = self.keys.len();
        let mut acc = [[_mm512_setzero_ps(); 8]; G];
        for (i, p) in self.keys.clone().enumerate() {
            let (row, vs) = self.slot(self.v, p);
            let mut f = [_mm512_setzero_ps(); G];
            for (j, f) in f.iter_mut().enumerate() {
                *f = _mm512_set1_ps(sc[j * n + i] * vs);
            }
            for c in 0..8 {
                let vv = T::load16(row.as_ptr().add(16 * c));
                for j in 0..G {
                    acc[j][c] = _mm512_fmadd_ps(f[j], vv, acc[j][c]);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (c, v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(j * (128 + 2) + 2 + 16 * c), *v);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const G: usize>(&self, sc: &mut [f32], out: &mut [f32]) {
        self.lanes::<G, true>(sc, out)
    }

    /// Turns head j's scores `sc[j·n..]` into `e^(s−max)` and starts its part of `out`:
    /// `[max, Σ e^(s−max), 0 …]`.
    #[inline(always)]
    fn softmax_partials<const G: usize>(&self, sc: &mut [f32], out: &mut [f32]) {
        let (n, part) = (self.keys.len(), self.a.head_dim + 2);
        for j in 0..G {
            let s = &mut sc[j * n..(j + 1) * n];
            let mut max = f32::NEG_INFINITY;
            for &x in s.iter() {
                max = max.max(x);
            }
            // The exps in a loop of their own, so it vectorises; the sum in order after it.
            for x in s.iter_mut() {
                *x = exp(*x - max);
            }
            let sum: f32 = s.iter().sum();
            let o = &mut out[j * part..(j + 1) * part];
            o[0] = max;
            o[1] = sum;
            o[2..].fill(0.0);
        }
    }

    /// The portable body (also AVX2's), over 16 independent lanes, with `sc` (`G·keys` long)
    /// for the scores; `FMA`: fused multiply-adds (only where the CPU has them: elsewhere
    /// `mul_add` is a libm call). No closures in these loops: one the compiler did not inline
    /// would be built without the caller's target features (it made the loops scalar and
    /// `mul_add` a libm call: 8× slower).
    #[inline(always)]
    fn lanes<const G: usize, const FMA: bool>(&self, sc: &mut [f32], out: &mut [f32]) {
        let (a, d) = (self.a, self.a.head_dim);
        let (n, tail) = (self.keys.len(), d / 16 * 16);
        let q = &a.q[self.head0 * d..(self.head0 + G) * d];
        // Scores: sc[j·n + i] for head j and the i-th key (zipped 16-value chunks, so the
        // compiler sees no bounds to check and vectorises).
        for (i, p) in self.keys.clone().enumerate() {
            let (row, ks) = self.slot(self.k, p);
            let s = a.scale * ks;
            for (j, qh) in q.chunks_exact(d).enumerate() {
                let mut acc = [0f32; 16];
                for (qc, kc) in qh.chunks_exact(16).zip(row.chunks_exact(16)) {
                    for l in 0..16 {
                        acc[l] = madd::<FMA>(qc[l], kc[l].widen(), acc[l]);
                    }
                }
                let mut dot = reduce(&mut acc);
                for t in tail..d {
                    dot += qh[t] * row[t].widen();
                }
                sc[j * n + i] = dot * s;
            }
        }
        self.softmax_partials::<G>(sc, out);
        self.values_lanes::<G, FMA>(sc, out);
    }

    /// `Σ e^(s−max)·v` per head into `out` (started by [`Task::softmax_partials`]), over 16
    /// independent lanes.
    #[inline(always)]
    fn values_lanes<const G: usize, const FMA: bool>(&self, sc: &[f32], out: &mut [f32]) {
        let d = self.a.head_dim;
        let (n, tail, part) = (self.keys.len(), d / 16 * 16, d + 2);
        for (i, p) in self.keys.clone().enumerate() {
            let (row, vs) = self.slot(self.v, p);
            for (j, o) in out.chunks_exact_mut(part).take(G).enumerate() {
                let f = sc[j * n + i] * vs;
                let o = &mut o[2..];
                for (oc, vc) in o.chunks_exact_mut(16).zip(row.chunks_exact(16)) {
                    for l in 0..16 {
                        oc[l] = madd::<FMA>(f, vc[l].widen(), oc[l]);
                    }
                }
                for t in tail..d {
                    o[t] += f * row[t].widen();
                }
            }
        }
    }
}

/// Prefetches the cache lines [`PREFETCH_AHEAD`] bytes past those of `row`.
#[inline(always)]
fn prefetch_row<T>(row: &[T]) {
    let ahead = row.as_ptr().cast::<u8>().wrapping_add(PREFETCH_AHEAD);
    for line in (0..std::mem::size_of_val(row)).step_by(64) {
        prefetch(ahead.wrapping_add(line));
    }
}

/// `a·b + c`, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Sum of 16 lanes as a tree (vectorises into shuffles).
#[inline(always)]
fn reduce(a: &mut [f32; 16]) -> f32 {
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            a[l] += a[l + w];
        }
    }
    a[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax(q·kᵀ·scale)·v in f64 over widened, scaled elements.
    fn reference<T: Widen>(a: &Query<'_>, k: Buffer<'_, T>, v: Buffer<'_, T>) -> Vec<f64> {
        let (d, group) = (a.head_dim, a.heads / a.kv_heads);
        let val = |b: Buffer<'_, T>, at: usize, i: usize| b.elems[at * d + i].widen() as f64 * b.scales.map_or(1.0, |s| s[at] as f64);
        let mut out = vec![0f64; a.heads * d];
        for h in 0..a.heads {
            let kv = h / group;
            let s: Vec<f64> = (0..a.len)
                .map(|p| (0..d).map(|i| a.q[h * d + i] as f64 * val(k, kv * a.capacity + p, i)).sum::<f64>() * a.scale as f64)
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (p, w) in e.iter().enumerate() {
                for i in 0..d {
                    out[h * d + i] += w / sum * val(v, kv * a.capacity + p, i);
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn matches_f64_attention_for_every_grouping_split_and_format() {
        // (heads, kv_heads, head_dim, len): groups of 1–8 query heads (3 as in Phi-4, 6 and 8
        // as two tasks' sets), head_dim off the 16-lane width, lengths inside one split and
        // across several (uneven) splits.
        for &(heads, kvh, d, len) in &[(24, 8, 128, 1), (24, 8, 128, 1000), (6, 2, 72, 300), (4, 4, 20, 5), (8, 1, 16, 777), (12, 2, 32, 2049), (4, 2, 24, 513)] {
            let cap = len + 3;
            let q = values(heads * d, 1);
            let kf = values(kvh * cap * d, 2);
            let vf = values(kvh * cap * d, 3);
            let a = Query { q: &q, heads, kv_heads: kvh, head_dim: d, capacity: cap, len, scale: 0.7 };
            let check = |got: &[f32], want: &[f64], what: &str| {
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!((*g as f64 - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{what} {heads}/{kvh}/{d}/{len} at {i}: {g} vs {w}");
                }
            };
            let mut out = vec![0f32; heads * d];
            attend(&a, Buffer::plain(&kf), Buffer::plain(&vf), &mut out);
            check(&out, &reference(&a, Buffer::plain(&kf), Buffer::plain(&vf)), "f32");
            let kb: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
            let vb: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
            attend(&a, Buffer::plain(&kb), Buffer::plain(&vb), &mut out);
            check(&out, &reference(&a, Buffer::plain(&kb), Buffer::plain(&vb)), "bf16");
            let ki: Vec<i8> = kf.iter().map(|&x| (x * 127.0) as i8).collect();
            let vi: Vec<i8> = vf.iter().map(|&x| (x * 127.0) as i8).collect();
            // Scales as the 8-bit cache makes them (max|x| / 127).
            let scales = |seed| values(kvh * cap, seed).iter().map(|x| (x.abs() + 0.5) / 127.0).collect::<Vec<f32>>();
            let (ks, vs) = (scales(4), scales(5));
            let (kq, vq) = (Buffer { elems: &ki[..], scales: Some(&ks[..]) }, Buffer { elems: &vi[..], scales: Some(&vs[..]) });
            attend(&a, kq, vq, &mut out);
            check(&out, &reference(&a, kq, vq), "i8");
        }
    }

    #[test]
    fn a_nan_key_gives_nan_not_a_silent_answer() {
        let (heads, kvh, d, len) = (3, 1, 16, 600);
        let q = values(heads * d, 1);
        let mut k = values(kvh * len * d, 2);
        let v = values(kvh * len * d, 3);
        k[450 * d + 3] = f32::NAN;
        let a = Query { q: &q, heads, kv_heads: kvh, head_dim: d, capacity: len, len, scale: 0.25 };
        let mut out = vec![0f32; heads * d];
        attend(&a, Buffer::plain(&k), Buffer::plain(&v), &mut out);
        assert!(out.iter().all(|x| x.is_nan()), "{out:?}");
    }
}

//! The prefix cache: the KV of prompt blocks and the encoded features of media, kept after a
//! request so that a later one starting the same way — a chat client re-sending its whole
//! conversation, a shared system prompt, the same image or recording — skips that work
//! (vLLM's automatic prefix caching, with our block size and media keys).
//!
//! Exactness. A block is one prefill chunk (`prefill_chunk` positions, aligned at position
//! 0), and only the KV of a *full* chunk computed by a prefill is kept: that is exactly what a
//! cold prefill of the same rows computes, chunk for chunk. A block's key chains the adapter,
//! the LongRoPE mode and every row up to the block's end — token ids, and for media rows a
//! key of the preprocessed media (an image's canvas and crop mask; the request's audio set:
//! every clip's log-mel features and the projector, since the clips are encoded together) and
//! the row's offset in it. A hit therefore gives the cold run's KV, the rest of the prompt is
//! prefilled in the cold run's chunks, and the result is bit-identical to a cold run. The cost
//! of that rule: the earlier prompt's last partial chunk and the earlier reply (decoded one
//! token at a time, which sums differently from a prefill chunk) are prefilled again — at
//! most one chunk more than the new tokens.
//!
//! Keys are two 64-bit SipHashes with random per-process keys, so a client cannot make its
//! prompt collide with another client's prefix.
//!
//! Memory: blocks count against the scheduler's KV budget and are evicted least recently used
//! first (the deepest block of a chain first) when an admission or a new block needs room;
//! media features are bounded by bytes.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use candle_core::Tensor;

use crate::error::Result;
use crate::decoder::kv_cache::{KvBlock, KvCache};
use crate::decoder::lora::Adapter;
use crate::text::prompt::{Mode, AUDIO_TOKEN_ID, IMAGE_TOKEN_ID};
use crate::engine::request::Prepared;

/// A 128-bit content key.
pub(super) type Key = (u64, u64);

/// What the caches did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// KV blocks held, and the positions they hold.
    pub blocks: usize,
    pub positions: usize,
    /// Prompts looked up, and those that reused at least one block.
    pub lookups: u64,
    pub hits: u64,
    /// Prompt positions taken from the cache instead of prefilled.
    pub reused_positions: u64,
    /// Blocks dropped to make room.
    pub evicted_blocks: u64,
    /// Media pieces (an image, a request's audio) taken from the cache, and encoded.
    pub media_hits: u64,
    pub media_misses: u64,
    /// Bytes of media features held.
    pub media_bytes: usize,
}

/// Random-keyed hashing into [`Key`]s.
struct Hashing {
    a: RandomState,
    b: RandomState,
}

impl Hashing {
    fn key(&self, f: impl Fn(&mut dyn Hasher)) -> Key {
        let (mut a, mut b) = (self.a.build_hasher(), self.b.build_hasher());
        f(&mut a);
        f(&mut b);
        (a.finish(), b.finish())
    }
}

/// The content keys of a request's media.
#[derive(Debug, Clone)]
pub(super) struct MediaKeys {
    /// One per image, and its placeholder rows.
    pub images: Vec<(Key, usize)>,
    /// All audios of the request together.
    pub audio: Option<Key>,
}

/// Where a row's input comes from, for the chain.
enum Row {
    Token(u32),
    Media(Key, usize),
}

/// Blocks of prompt KV and encoded media, with their keys.
pub(super) struct PrefixCache {
    hashing: Hashing,
    block: usize,
    kv_enabled: bool,
    blocks: HashMap<Key, Entry>,
    media: HashMap<Key, (Tensor, u64)>,
    media_max: usize,
    tick: u64,
    stats: CacheStats,
}

struct Entry {
    kv: KvBlock,
    used: u64,
    depth: usize,
}

impl PrefixCache {
    /// Blocks of `block` positions (when `kv` is on) and up to `media_bytes` of media features.
    pub fn new(block: usize, kv: bool, media_bytes: usize) -> Self {
        PrefixCache {
            hashing: Hashing { a: RandomState::new(), b: RandomState::new() },
            block: block.max(1),
            kv_enabled: kv,
            blocks: HashMap::new(),
            media: HashMap::new(),
            media_max: media_bytes,
            tick: 0,
            stats: CacheStats::default(),
        }
    }

    /// Whether anything is cached at all (else no keys are computed).
    pub fn enabled(&self) -> bool {
        self.kv_enabled || self.media_max > 0
    }

    pub fn block(&self) -> usize {
        self.block
    }

    pub fn stats(&self) -> CacheStats {
        let mut s = self.stats;
        s.blocks = self.blocks.len();
        s.positions = self.positions();
        s.media_bytes = self.media_bytes();
        s
    }

    /// Positions held by KV blocks.
    pub fn positions(&self) -> usize {
        self.blocks.len() * self.block
    }

    /// The keys of a prepared request's media.
    pub fn media_keys(&self, p: &Prepared) -> MediaKeys {
        let images = p
            .images
            .iter()
            .map(|img| {
                let key = self.hashing.key(|h| {
                    h.write(b"image");
                    for n in [img.grid.0, img.grid.1, img.canvas.width, img.canvas.height, img.num_tokens] {
                        h.write_usize(n);
                    }
                    h.write(&img.canvas.data);
                    h.write(&img.mask);
                });
                (key, img.num_tokens)
            })
            .collect();
        let audio = (!p.audios.is_empty()).then(|| {
            self.hashing.key(|h| {
                h.write(b"audio");
                h.write_u8(u8::from(p.mode == Mode::VisionSpeech));
                h.write_usize(p.audios.len());
                for a in &p.audios {
                    h.write_usize(a.frames);
                    h.write(bytemuck::cast_slice(&a.data));
                }
            })
        });
        MediaKeys { images, audio }
    }

    /// The key of every full block of rows `prompt ++ outputs` (outputs are token rows), in
    /// `adapter` and LongRoPE mode `long`.
    pub fn chain(&self, prompt: &[u32], outputs: &[u32], media: &MediaKeys, adapter: Option<Adapter>, long: bool) -> Vec<Key> {
        let rows = rows(prompt, outputs, media);
        let mut prev = self.hashing.key(|h| {
            h.write(b"phi4mm-kv-1");
            h.write_u8(adapter.map_or(0, |a| 1 + a as u8));
            h.write_u8(u8::from(long));
            h.write_usize(self.block);
        });
        let mut keys = Vec::with_capacity(rows.len() / self.block);
        for chunk in rows.chunks_exact(self.block) {
            prev = self.hashing.key(|h| {
                h.write_u64(prev.0);
                h.write_u64(prev.1);
                for r in chunk {
                    match r {
                        Row::Token(t) => {
                            h.write_u8(0);
                            h.write_u32(*t);
                        }
                        Row::Media(k, off) => {
                            h.write_u8(1);
                            h.write_u64(k.0);
                            h.write_u64(k.1);
                            h.write_usize(*off);
                        }
                    }
                }
            });
            keys.push(prev);
        }
        keys
    }

    /// Writes the longest cached run of `keys` (at most `most` blocks) into `cache` from
    /// position 0 and returns the positions written.
    pub fn restore(&mut self, keys: &[Key], most: usize, cache: &mut KvCache, limit: usize) -> Result<usize> {
        if !self.kv_enabled {
            return Ok(0);
        }
        self.stats.lookups += 1;
        let n = keys.iter().take(most).take_while(|k| self.blocks.contains_key(k)).count();
        if n == 0 {
            return Ok(0);
        }
        self.tick += 1;
        cache.reserve(n * self.block, limit)?;
        for (i, k) in keys[..n].iter().enumerate() {
            if let Some(e) = self.blocks.get_mut(k) {
                e.used = self.tick;
                cache.import(i * self.block, &e.kv)?;
            }
        }
        self.stats.hits += 1;
        self.stats.reused_positions += (n * self.block) as u64;
        Ok(n * self.block)
    }

    /// Keeps the block `chain.len() - 1` of `cache` (its key the last of `chain`, the keys of
    /// the blocks before it first) if `room` positions of the budget (beyond the running
    /// sequences) allow it. The chain before it is touched too, so a block's ancestors are
    /// never older than it; an older block is evicted for it, but never one that would outlive
    /// it (a block without its ancestors is never hit).
    pub fn keep(&mut self, chain: &[Key], cache: &KvCache, room: usize) -> Result<()> {
        let Some((&key, before)) = chain.split_last() else { return Ok(()) };
        if !self.kv_enabled || room < self.block {
            return Ok(());
        }
        self.tick += 1;
        for k in chain {
            if let Some(e) = self.blocks.get_mut(k) {
                e.used = self.tick;
            }
        }
        if self.blocks.contains_key(&key) {
            return Ok(());
        }
        let depth = before.len();
        let rank = (self.tick, std::cmp::Reverse(depth));
        while self.positions() + self.block > room {
            match self.victim() {
                Some((k, r)) if r < rank => {
                    self.blocks.remove(&k);
                    self.stats.evicted_blocks += 1;
                }
                _ => return Ok(()),
            }
        }
        let kv = cache.export(depth * self.block, self.block)?;
        self.blocks.insert(key, Entry { kv, used: self.tick, depth });
        Ok(())
    }

    /// The block to evict first: least recently used, the deepest of a chain first.
    fn victim(&self) -> Option<(Key, (u64, std::cmp::Reverse<usize>))> {
        self.blocks.iter().map(|(k, e)| (*k, (e.used, std::cmp::Reverse(e.depth)))).min_by_key(|(_, r)| *r)
    }

    /// Evicts blocks until at most `positions` are held.
    pub fn shrink_to(&mut self, positions: usize) {
        while self.positions() > positions {
            let Some((k, _)) = self.victim() else { break };
            self.blocks.remove(&k);
            self.stats.evicted_blocks += 1;
        }
    }

    /// The features of media `key` from the cache (counted as a hit), or none (a miss, or
    /// caching off: no key).
    pub fn media_get(&mut self, key: Option<Key>) -> Option<Tensor> {
        let key = key?;
        self.tick += 1;
        match self.media.get_mut(&key) {
            Some((t, used)) => {
                *used = self.tick;
                self.stats.media_hits += 1;
                Some(t.clone())
            }
            None => {
                self.stats.media_misses += 1;
                None
            }
        }
    }

    /// Keeps the encoded features of media `key`, evicting the least recently used features
    /// beyond the byte bound (features larger than the bound are not kept).
    pub fn media_keep(&mut self, key: Option<Key>, feats: &Tensor) {
        let Some(key) = key else { return };
        if tensor_bytes(feats) > self.media_max {
            return;
        }
        self.tick += 1;
        self.media.insert(key, (feats.clone(), self.tick));
        while self.media_bytes() > self.media_max {
            let victim = self.media.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k);
            let Some(k) = victim else { break };
            self.media.remove(&k);
        }
    }

    fn media_bytes(&self) -> usize {
        self.media.values().map(|(t, _)| tensor_bytes(t)).sum()
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Every row of `prompt ++ outputs`: placeholder rows are their media's (images in order,
/// the audio set as one piece), the rest tokens.
fn rows(prompt: &[u32], outputs: &[u32], media: &MediaKeys) -> Vec<Row> {
    let mut rows = Vec::with_capacity(prompt.len() + outputs.len());
    let (mut img, mut img_off, mut aud_off) = (0, 0, 0);
    for &t in prompt {
        rows.push(match (t, media.images.get(img), media.audio) {
            (IMAGE_TOKEN_ID, Some(&(key, n)), _) => {
                let r = Row::Media(key, img_off);
                img_off += 1;
                if img_off == n {
                    (img, img_off) = (img + 1, 0);
                }
                r
            }
            (AUDIO_TOKEN_ID, _, Some(key)) => {
                aud_off += 1;
                Row::Media(key, aud_off - 1)
            }
            _ => Row::Token(t),
        });
    }
    rows.extend(outputs.iter().map(|&t| Row::Token(t)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A 2-layer cache of `len` positions, and the keys it holds (values are twice them).
    fn cache_with(len: usize) -> Result<(KvCache, Tensor)> {
        let dev = Device::Cpu;
        let mut c = KvCache::new(2, 2, 4, len, DType::F32, &dev)?;
        let k = (Tensor::arange(0f32, (2 * len * 4) as f32, &dev)?.reshape((2, len, 4))? + 0.5)?;
        for layer in 0..2 {
            c.write(layer, 0, &k, &(&k * 2.0)?)?;
        }
        c.set_len(len);
        Ok((c, k))
    }

    #[test]
    fn keys_depend_on_every_earlier_row_the_adapter_and_the_mode() {
        let pc = PrefixCache::new(4, true, 0);
        let none = MediaKeys { images: Vec::new(), audio: None };
        let ids: Vec<u32> = (0..12).collect();
        let base = pc.chain(&ids, &[], &none, None, false);
        assert_eq!(base.len(), 3, "only full blocks get keys");
        let mut other = ids.clone();
        other[1] = 99;
        let changed = pc.chain(&other, &[], &none, None, false);
        assert!(changed.iter().zip(&base).all(|(a, b)| a != b), "a change in block 0 changes every later key");
        other = ids.clone();
        other[9] = 99;
        assert_eq!(pc.chain(&other, &[], &none, None, false)[..2], base[..2]);
        assert_ne!(pc.chain(&ids, &[], &none, Some(Adapter::Speech), false)[0], base[0]);
        assert_ne!(pc.chain(&ids, &[], &none, None, true)[0], base[0]);
        assert_eq!(pc.chain(&ids[..8], &ids[8..], &none, None, false), base, "outputs are token rows");
    }

    #[test]
    fn media_rows_are_keyed_by_content_not_by_placeholder() {
        let pc = PrefixCache::new(4, true, 0);
        let (a, b) = (pc.hashing.key(|h| h.write(b"a")), pc.hashing.key(|h| h.write(b"b")));
        let ids = [1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID];
        let with = |k| MediaKeys { images: vec![(k, 3)], audio: None };
        assert_ne!(pc.chain(&ids, &[], &with(a), Some(Adapter::Vision), false), pc.chain(&ids, &[], &with(b), Some(Adapter::Vision), false));
        // A generated placeholder id after the prompt is a token row, not media.
        let gen = pc.chain(&ids[..1], &ids[1..], &with(a), Some(Adapter::Vision), false);
        assert_ne!(gen, pc.chain(&ids, &[], &with(a), Some(Adapter::Vision), false));
    }

    #[test]
    fn restore_gives_the_stored_positions_and_eviction_is_least_recent_deepest_first() -> Result<()> {
        let mut pc = PrefixCache::new(4, true, 0);
        let none = MediaKeys { images: Vec::new(), audio: None };
        let ids: Vec<u32> = (0..12).collect();
        let keys = pc.chain(&ids, &[], &none, None, false);
        let (src, k) = cache_with(12)?;
        for d in 0..keys.len() {
            pc.keep(&keys[..=d], &src, 100)?;
        }
        assert_eq!(pc.positions(), 12);
        let mut dst = KvCache::new(2, 2, 4, 16, DType::F32, &Device::Cpu)?;
        assert_eq!(pc.restore(&keys, 2, &mut dst, 64)?, 8, "at most `most` blocks");
        assert_eq!(dst.len(), 8);
        let zero = Tensor::zeros((2, 1, 4), DType::F32, &Device::Cpu)?;
        let (k_dst, v_dst) = dst.append(1, 8, &zero, &zero)?;
        assert_eq!(k_dst.narrow(1, 0, 8)?.to_vec3::<f32>()?, k.narrow(1, 0, 8)?.to_vec3::<f32>()?);
        assert_eq!(v_dst.narrow(1, 0, 8)?.to_vec3::<f32>()?, (k.narrow(1, 0, 8)? * 2.0)?.to_vec3::<f32>()?);
        // Blocks 0 and 1 were just used: block 2 goes first, then 1 (deeper), then 0.
        pc.shrink_to(8);
        assert_eq!(pc.restore(&keys, 3, &mut KvCache::new(2, 2, 4, 4, DType::F32, &Device::Cpu)?, 64)?, 8);
        pc.shrink_to(4);
        assert_eq!(pc.restore(&keys, 3, &mut KvCache::new(2, 2, 4, 4, DType::F32, &Device::Cpu)?, 64)?, 4);
        assert_eq!(pc.stats().evicted_blocks, 2);
        // Room for two: keeping a chain of three keeps its first two, not its last two.
        let mut pc = PrefixCache::new(4, true, 0);
        let keys = pc.chain(&ids, &[], &none, None, false);
        for d in 0..keys.len() {
            pc.keep(&keys[..=d], &src, 8)?;
        }
        assert_eq!(pc.restore(&keys, 3, &mut KvCache::new(2, 2, 4, 4, DType::F32, &Device::Cpu)?, 64)?, 8);
        Ok(())
    }
}

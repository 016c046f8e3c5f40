//! Prefill a piece at a time: rows go through the blocks a third of a block per call (the
//! attention with its residual; the MLP's gate/up product; its down product with the
//! residual), so a scheduler can run a long prompt between decode steps without holding the
//! others for a whole pass. The pieces compute exactly what one
//! uninterrupted pass computes: [`Decoder::forward_as`] is a [`Prefill`] run to its end.

use candle_core::Tensor;

use super::{Decoder, KvCache};
use crate::decoder::lora::Adapter;
use crate::error::{Error, Result};

/// Pieces each block is run in.
pub(super) const PIECES_PER_BLOCK: usize = 3;

/// Rows on their way through the decoder; see [`Decoder::prefill`].
#[derive(Debug)]
pub struct Prefill {
    embeds: Tensor,
    start: usize,
    /// Rows per pass (the decoder's own chunking of long inputs).
    rows: usize,
    long: bool,
    adapter: Option<Adapter>,
    /// First position of the pass in flight (or of the next one).
    pos: usize,
    pass: Option<Pass>,
    /// A single row on the tensor-free step (one piece).
    single: bool,
    /// Pieces run so far, over all passes.
    done: usize,
}

/// One pass in flight: the residual stream (and the MLP's inner activations between its two
/// pieces) and how many pieces it has been through.
#[derive(Debug)]
struct Pass {
    x: Tensor,
    mid: Option<Tensor>,
    cos_sin: (Tensor, Tensor),
    piece: usize,
}

impl Prefill {
    /// Rows this job prefills.
    pub fn len(&self) -> usize {
        self.embeds.dims().first().copied().unwrap_or(0)
    }

    /// Whether the job has no rows (never true for a job the decoder made).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the next piece is: 0 a block's attention, 1 its gate/up product, 2 its down product.
    pub fn next_piece(&self) -> usize {
        self.pass.as_ref().map_or(0, |p| p.piece % PIECES_PER_BLOCK)
    }

    /// (pieces done, pieces in all).
    pub fn progress(&self, dec: &Decoder) -> (usize, usize) {
        let total = if self.single { 1 } else { self.len().div_ceil(self.rows) * PIECES_PER_BLOCK * dec.layers.len() };
        (self.done, total)
    }
}

impl Decoder {
    /// Starts prefilling `embeds` `[n, hidden]` at the positions following the cache in the
    /// given LongRoPE mode (checked as [`Decoder::forward_as`] does); run it with
    /// [`Decoder::advance`].
    pub fn prefill(&self, embeds: &Tensor, cache: &mut KvCache, adapter: Option<Adapter>, long: bool) -> Result<Prefill> {
        let n = embeds.dim(0)?;
        let start = cache.len();
        if n == 0 {
            return Err(Error::Request("empty input".into()));
        }
        if let Some(a) = adapter.filter(|&a| !self.has_adapter(a)) {
            return Err(Error::Request(format!("this checkpoint has no {} LoRA adapter", a.name())));
        }
        if start == 0 {
            cache.reset(long);
        } else if long != cache.is_long() {
            return Err(Error::Request("KV cache was filled with the other LongRoPE factors; re-prefill".into()));
        }
        Ok(Prefill {
            embeds: embeds.clone(),
            start,
            rows: self.prefill_chunk(start + n),
            long,
            adapter,
            pos: start,
            pass: None,
            single: n == 1 && self.can_step(cache),
            done: 0,
        })
    }

    /// Runs the next piece of `job`: a third of a block of the pass in flight (starting a pass
    /// when none is). After the last piece the cache holds every row and the final normalised
    /// hidden state of the last row `[1, hidden]` is returned.
    pub fn advance(&self, job: &mut Prefill, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let end = job.start + job.len();
        if job.single {
            let h = self.step(&job.embeds, job.start, job.long, cache, job.adapter)?;
            cache.set_len(job.start + 1);
            job.done += 1;
            return Ok(Some(h));
        }
        let len = job.rows.min(end - job.pos);
        let pass = match job.pass.take() {
            Some(p) => p,
            None => Pass {
                x: job.embeds.narrow(0, job.pos - job.start, len)?.to_dtype(self.dtype)?,
                mid: None,
                cos_sin: self.rope.cos_sin(job.pos, len, job.long, self.dtype, &self.device)?,
                piece: 0,
            },
        };
        let (i, p) = (pass.piece / PIECES_PER_BLOCK, pass.piece % PIECES_PER_BLOCK);
        let (x, mid) = self.block_piece(i, p, (pass.x, pass.mid), job.pos, &pass.cos_sin, cache, job.adapter)?;
        job.done += 1;
        let piece = pass.piece + 1;
        if piece < PIECES_PER_BLOCK * self.layers.len() {
            job.pass = Some(Pass { x, mid, cos_sin: pass.cos_sin, piece });
            return Ok(None);
        }
        job.pos += len;
        cache.set_len(job.pos);
        if job.pos < end {
            return Ok(None);
        }
        let h_last = x.narrow(0, x.dim(0)? - 1, 1)?;
        Ok(Some(self.norm.forward(&h_last)?))
    }

    /// Piece `piece` of block `i` over the residual stream `x` `[len, hidden]` at positions
    /// `pos..` (with the MLP's inner activations between its pieces): 0 the attention with its
    /// residual, 1 the MLP's gate/up product and SwiGLU, 2 its down product with the residual.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_piece(
        &self,
        i: usize,
        piece: usize,
        (x, mid): (Tensor, Option<Tensor>),
        pos: usize,
        cos_sin: &(Tensor, Tensor),
        cache: &mut KvCache,
        adapter: Option<Adapter>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layer = &self.layers[i];
        match (piece, mid) {
            (0, _) => {
                let a = layer.self_attn.forward(&layer.input_layernorm.forward(&x)?, i, pos, cos_sin, &self.rope, cache, adapter)?;
                Ok(((x + a)?, None))
            }
            (1, _) => {
                let h = layer.mlp.up(&layer.post_attention_layernorm.forward(&x)?, adapter)?;
                Ok((x, Some(h)))
            }
            (_, Some(h)) => {
                let m = layer.mlp.down(&h, adapter)?;
                Ok(((x + m)?, None))
            }
            (_, None) => Err(Error::Request("the MLP's down piece ran before its up piece".into())),
        }
    }
}

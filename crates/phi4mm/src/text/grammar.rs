//! Constrained generation: a JSON schema or a Lark grammar turned into a per-step token mask
//! with llguidance (the grammar engine llama.cpp, vLLM, SGLang and mistral.rs use), plugged
//! into the sampler's [`TokenMask`] hook.
//!
//! llguidance needs the vocabulary as a token trie. Its ready-made bridge to the `tokenizers`
//! crate pins another major version of that crate, so the small bridge lives here: every id's
//! exact bytes, added tokens (`<|end|>`, `<|tool_call|>`, …) marked as special so a Lark
//! grammar names them as `<|tool_call|>`, and the ids past the tokenizer (the model's padded
//! vocabulary) as special placeholders no grammar allows.
//!
//! A grammar's end is the end of the turn: when the grammar may stop, `<|end|>` and the
//! end-of-text token are allowed; once it must stop, only they are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::text::sampler::{MaskHook, TokenMask};
use crate::text::tokenizer::Tokenizer;

/// The vocabulary as llguidance sees it.
struct Env {
    trie: TokTrie,
    tok: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tok.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default())
    }
}

/// Time spent computing masks, over every grammar of one [`Grammars`].
#[derive(Debug, Default)]
pub struct MaskStats {
    pub masks: AtomicU64,
    pub nanos: AtomicU64,
}

/// Builds grammar masks for one model (the trie is built once; each mask is cheap to make).
pub struct Grammars {
    factory: Arc<ParserFactory>,
    end: Vec<u32>,
    stats: Arc<MaskStats>,
}

impl Grammars {
    /// The grammar engine over `tok`'s vocabulary padded to `n_vocab` ids; `end` are the ids
    /// that end a turn (the first is the one the model writes, `<|end|>`).
    pub fn new(tok: &Tokenizer, n_vocab: usize, end: &[u32]) -> Result<Self> {
        let first = *end.first().ok_or_else(|| Error::Request("a grammar needs an end-of-turn token".into()))?;
        let inner = tok.inner().clone();
        let added = inner.get_added_tokens_decoder();
        let mut words = Vec::with_capacity(n_vocab);
        for id in 0..n_vocab as u32 {
            let mut w = Vec::new();
            match (added.get(&id), tok.token_bytes(id)) {
                (Some(a), _) => {
                    w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    w.extend_from_slice(a.content.as_bytes());
                }
                (None, Some(b)) => w = b,
                (None, None) => {
                    w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    w.extend_from_slice(format!("<|unused_{id}|>").as_bytes());
                }
            }
            words.push(w);
        }
        let mut info = TokRxInfo::new(n_vocab as u32, first);
        info.tok_end_of_turn = Some(first);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env { trie, tok: inner });
        let factory = ParserFactory::new_simple(&env).map_err(|e| Error::Request(format!("grammar engine: {e}")))?;
        Ok(Grammars { factory: Arc::new(factory), end: end.to_vec(), stats: Arc::new(MaskStats::default()) })
    }

    /// A mask that keeps the output valid JSON for `schema` (a JSON Schema).
    pub fn json_schema(&self, schema: serde_json::Value) -> Result<MaskHook> {
        self.mask(TopLevelGrammar::from_json_schema(schema))
    }

    /// A mask for a Lark grammar (llguidance's dialect: `%json {…}` embeds a schema,
    /// `<|name|>` is a special token).
    pub fn lark(&self, grammar: &str) -> Result<MaskHook> {
        self.mask(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    /// The masks computed so far and the time they took.
    pub fn stats(&self) -> &MaskStats {
        &self.stats
    }

    fn mask(&self, g: TopLevelGrammar) -> Result<MaskHook> {
        let parser = self.factory.create_parser(g).map_err(|e| Error::Request(format!("invalid grammar: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Request(format!("invalid grammar: {e}")));
        }
        let m = GrammarMask { matcher, consumed: 0, end: self.end.clone(), stats: self.stats.clone() };
        Ok(MaskHook(Arc::new(Mutex::new(m))))
    }
}

/// One request's grammar state.
struct GrammarMask {
    matcher: Matcher,
    consumed: usize,
    end: Vec<u32>,
    stats: Arc<MaskStats>,
}

impl GrammarMask {
    fn only_end(&self, allowed: &mut [bool]) {
        allowed.iter_mut().for_each(|a| *a = false);
        for &e in &self.end {
            if let Some(a) = allowed.get_mut(e as usize) {
                *a = true;
            }
        }
    }
}

impl TokenMask for GrammarMask {
    fn allowed(&mut self, generated: &[u32], allowed: &mut [bool]) {
        let start = Instant::now();
        if generated.len() > self.consumed {
            // A token the mask did not allow (the sampler's fall-back) puts the matcher in
            // its error state, which ends the output below.
            let _ = self.matcher.consume_tokens(&generated[self.consumed..]);
            self.consumed = generated.len();
        }
        if self.matcher.is_stopped() {
            self.only_end(allowed);
        } else {
            match self.matcher.compute_mask() {
                Ok(v) => {
                    let may_end = v.is_allowed(self.end[0]);
                    for (i, a) in allowed.iter_mut().enumerate() {
                        *a = v.is_allowed(i as u32);
                    }
                    if may_end {
                        for &e in &self.end {
                            if let Some(a) = allowed.get_mut(e as usize) {
                                *a = true;
                            }
                        }
                    }
                }
                Err(_) => self.only_end(allowed),
            }
        }
        self.stats.masks.fetch_add(1, Ordering::Relaxed);
        self.stats.nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

//! Turning generated ids into text as they arrive: an incremental decoder that only emits
//! complete UTF-8 (a character split over several byte-level tokens is held back until its last
//! byte arrives), and a stop-string matcher that holds back text that might begin a stop string.

use crate::error::Result;
use crate::text::tokenizer::Tokenizer;

/// Incremental detokenizer (the prefix/read-offset scheme used by TGI and vLLM).
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let out = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(if now.len() > before.len() && now.is_char_boundary(before.len()) {
            now[before.len()..].to_string()
        } else {
            String::new()
        })
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns the text safe to emit and whether a stop string was reached (the
    /// stop string and anything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..k]) {
                    hold = hold.max(k);
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pushes() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("hello ST"), ("hello ".into(), false));
        assert_eq!(m.push("O"), (String::new(), false));
        assert_eq!(m.push("Px"), (String::new(), true));
    }

    #[test]
    fn held_text_is_released_when_it_diverges() {
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("a\n"), ("a".into(), false));
        assert_eq!(m.push("b"), ("\nb".into(), false));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut m = StopMatcher::new(vec!["cd".into(), "b".into()]);
        assert_eq!(m.push("abcd"), ("a".into(), true));
    }
}

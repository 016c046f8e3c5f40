//! Scoring predictions the way the field does, so a phi4mm figure can be set beside a published
//! one: word and character error rates as jiwer 4.0 computes them ([`wer`], [`cer`]), corpus
//! BLEU as sacreBLEU 2.6 computes it ([`corpus_bleu`], with its tokenizers and signature) and
//! exact-match accuracy ([`accuracy`], the official vision fine-tuning script's check).
//!
//! Hand-written because no crate reproduces those definitions exactly: `rwer` counts graphemes
//! after NFC where jiwer counts code points, and `bleuscore` implements another smoothing. The
//! expected values of `reference/make_metrics.py` (jiwer and sacreBLEU themselves, on
//! `fixtures/metrics/pairs.jsonl`) test every definition here.

mod bleu;
mod edit;

pub use bleu::{corpus_bleu, Bleu, BleuTokenize};
pub use edit::{cer, wer};

/// Python's `str.isspace` (what `str.split()` and `str.strip()` cut on): Unicode White_Space
/// plus the four ASCII separators U+001C..U+001F.
pub(crate) fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.split()`.
pub(crate) fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_space).filter(|w| !w.is_empty())
}

/// Python's `s.strip()`.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// Exact-match accuracy as a fraction: a prediction counts when, trimmed and lowercased, it
/// equals its reference trimmed and lowercased (the official vision script's
/// `strip().lower()` check of the answer letter). `None` for an empty set.
pub fn accuracy<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<f64> {
    let (mut n, mut hits) = (0usize, 0usize);
    for (r, p) in pairs {
        n += 1;
        hits += usize::from(py_strip(r).to_lowercase() == py_strip(p).to_lowercase());
    }
    (n > 0).then(|| hits as f64 / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_includes_the_ascii_separators() {
        assert_eq!(py_split(" a\x1cb\u{3000}c\t").collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(py_strip("\x1f x \u{a0}"), "x");
    }

    #[test]
    fn accuracy_ignores_case_and_surrounding_space() {
        let pairs = [("B", " b\n"), ("A", "C"), ("D", "D.")];
        assert_eq!(accuracy(pairs.iter().map(|(r, p)| (*r, *p))), Some(1.0 / 3.0));
        assert_eq!(accuracy(std::iter::empty()), None);
    }
}

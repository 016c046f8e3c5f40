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
pub mod data;
mod edit;
mod normalize;
mod numbers;

pub use bleu::{corpus_bleu, Bleu, BleuTokenize};
pub use data::{read_examples, Example, Task};
pub use edit::{cer, wer};
pub use normalize::Normalize;

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

/// The metrics of a scored set; each is present when its task computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Pairs scored.
    pub n: usize,
    /// Corpus WER as a fraction (jiwer's convention).
    pub wer: Option<f64>,
    /// Corpus CER as a fraction.
    pub cer: Option<f64>,
    pub bleu: Option<Bleu>,
    /// Exact-match accuracy as a fraction.
    pub accuracy: Option<f64>,
}

/// Scores `(reference, prediction)` pairs with `task`'s metrics (every metric when `None`):
/// WER and CER for [`Task::Asr`] after `normalize` of both sides (a pair whose reference
/// normalises to nothing is left out of WER and CER, as the Open ASR leaderboard does, when
/// `normalize` is not the identity), BLEU for [`Task::Ast`], accuracy for [`Task::Vqa`].
pub fn score(pairs: &[(String, String)], task: Option<&Task>, tok: BleuTokenize, normalize: Option<&dyn Fn(&str) -> String>) -> Scores {
    let wants = |t: fn(&Task) -> bool| task.is_none_or(t);
    let mut s = Scores { n: pairs.len(), wer: None, cer: None, bleu: None, accuracy: None };
    if wants(|t| matches!(t, Task::Asr)) {
        let normed: Vec<(String, String)> = match normalize {
            Some(f) => pairs.iter().map(|(r, p)| (f(r), f(p))).filter(|(r, _)| !py_strip(r).is_empty()).collect(),
            None => pairs.to_vec(),
        };
        let refs = || normed.iter().map(|(r, p)| (r.as_str(), p.as_str()));
        s.wer = Some(wer(refs()));
        s.cer = Some(cer(refs()));
    }
    let pairs = || pairs.iter().map(|(r, p)| (r.as_str(), p.as_str()));
    if wants(|t| matches!(t, Task::Ast { .. })) {
        s.bleu = Some(corpus_bleu(pairs(), tok));
    }
    if wants(|t| matches!(t, Task::Vqa)) {
        s.accuracy = accuracy(pairs());
    }
    s
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

    #[test]
    fn a_task_scores_only_its_metrics() {
        let pairs = vec![("a b".to_string(), "a c".to_string()), ("[noise]".to_string(), "x".to_string())];
        let asr = score(&pairs, Some(&Task::Asr), BleuTokenize::V13a, None);
        assert_eq!((asr.wer, asr.bleu.is_none(), asr.accuracy), (Some(2.0 / 3.0), true, None));
        let drop_brackets = |s: &str| if s.starts_with('[') { String::new() } else { s.to_string() };
        let normed = score(&pairs, Some(&Task::Asr), BleuTokenize::V13a, Some(&drop_brackets));
        assert_eq!(normed.wer, Some(0.5));
        let all = score(&pairs, None, BleuTokenize::V13a, None);
        assert!(all.wer.is_some() && all.cer.is_some() && all.bleu.is_some() && all.accuracy == Some(0.0));
    }
}

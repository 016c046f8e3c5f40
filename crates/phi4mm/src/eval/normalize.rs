//! Text normalisation before scoring: [`Normalize::WhisperEn`] is a port of OpenAI Whisper's
//! `EnglishTextNormalizer` (whisper/normalizers/english.py and basic.py of openai-whisper
//! 20250625, MIT licence, copied in `WHISPER-LICENSE` beside this file), the normaliser the Open
//! ASR leaderboard applies to references and predictions before WER. `english.json`, its
//! British-to-American spelling list, is Whisper's file unchanged.
//!
//! Hand-written because no crate does it: the normaliser is a page of Python whose regular
//! expressions, number grammar (in `numbers.rs`) and Unicode handling define the leaderboard's
//! figures, so each step is reproduced as written, in order. `reference/make_normalize.py` runs
//! Whisper itself over `fixtures/metrics/normalize.json`, which `tests/normalize.rs` checks.
//!
//! Python's `re` semantics are kept where they differ from the `regex` crate's: `\s` also
//! matches U+001C..U+001F (as `str.isspace` does), and `\b` is Python's (a word character is
//! a letter, a number or `_`, where Rust counts combining marks and connector punctuation too),
//! emulated by checking the characters around a match (see [`PyRe`]). Python's arbitrary-
//! precision ints and `Fraction`s are exact decimal-digit arithmetic here, and digits of other
//! scripts (`٣`) are read as Python's `int()` reads them.
//!
//! Known deviations from Python 3.11 running whisper:
//! * Unicode versions. Python 3.11 has Unicode 14.0 for `str.lower`, `unicodedata` (NFKD,
//!   general categories) and `re`; here `str::to_lowercase` has std's tables (17.0 with Rust
//!   1.95), `unicode-normalization` and `unicode-properties` 18.0, and `regex` (`\b`, `\d`,
//!   `\s`) 16.0. Characters assigned after 14.0 can come out differently: Python sees them as
//!   unassigned (`Cn`) and keeps them, where here a new emoji is a symbol and becomes a space and
//!   a new combining mark is dropped. Characters whose category changed do too (U+1171E, a
//!   nonspacing mark in 14.0 that Python drops, is a spacing mark now and becomes a space). A
//!   check of every character assigned in 14.0 found no other difference.
//! * Python would stop with an `AssertionError` or `ValueError` on a few branches of
//!   `process_words` and `postprocess`; none of them can be reached, and here they do not exist.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use regex::{Captures, NoExpand, Regex};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use super::numbers;
use super::py_split;
use crate::error::{Error, Result};

/// How predictions and references are normalised before they are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalize {
    /// Scored as they are.
    #[default]
    None,
    /// Whisper's `EnglishTextNormalizer` (the Open ASR leaderboard's).
    WhisperEn,
}

impl Normalize {
    /// Parses `none` or `whisper-en`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Normalize::None,
            "whisper-en" => Normalize::WhisperEn,
            _ => return Err(Error::Request(format!("unknown normaliser `{s}`: use none or whisper-en"))),
        })
    }

    /// The name [`parse`](Self::parse) reads.
    pub fn name(self) -> &'static str {
        match self {
            Normalize::None => "none",
            Normalize::WhisperEn => "whisper-en",
        }
    }

    /// `s` normalised.
    pub fn apply(self, s: &str) -> String {
        match (self, rules()) {
            (Normalize::WhisperEn, Some(r)) => whisper_en(s, r),
            _ => s.to_owned(),
        }
    }
}

/// A Python word character (`\w`: `str.isalnum()` or `_`, which is exactly the letters and
/// numbers), as the inside of a `regex` class, so that both sides of a `\b` use one Unicode
/// table.
const PY_WORD: &str = r"\p{L}\p{N}_";

/// A pattern with Python's `\b` at its start and/or end, where the pattern's first (last)
/// character is always a word character: a match may not follow (be followed by) a word
/// character. The end is checked inside the regex by a group that matches the following
/// character (or the end), so the alternatives are tried in Python's order; the start by
/// looking at the character before each leftmost match and moving on one character if it fails.
pub(super) struct PyRe {
    re: Regex,
    /// `PY_WORD`, when the pattern has `\b` at its start.
    word_before: Option<Regex>,
    end: bool,
}

impl PyRe {
    /// `None` only if the constant pattern were invalid.
    pub(super) fn new(core: &str, start: bool, end: bool) -> Option<Self> {
        let pattern = if end { format!(r"(?:{core})(?P<after>[^{PY_WORD}]|\z)") } else { core.to_owned() };
        let word_before = if start { Some(Regex::new(&format!("[{PY_WORD}]")).ok()?) } else { None };
        Some(PyRe { re: Regex::new(&pattern).ok()?, word_before, end })
    }

    /// Python's leftmost non-overlapping matches: the span of each and its groups.
    fn matches<'h>(&self, s: &'h str) -> Vec<(Range<usize>, Captures<'h>)> {
        let mut found = Vec::new();
        let mut pos = 0;
        while let Some(c) = self.re.captures_at(s, pos) {
            let Some(whole) = c.get(0) else { break };
            let begin = whole.start();
            let end = if self.end { c.name("after").map_or(whole.end(), |a| a.start()) } else { whole.end() };
            let prev = s[..begin].chars().next_back().map_or("", |c| &s[begin - c.len_utf8()..begin]);
            let after_word = self.word_before.as_ref().is_some_and(|w| w.is_match(prev));
            if after_word || end == begin {
                match s[begin..].chars().next() {
                    Some(ch) => pos = begin + ch.len_utf8(),
                    None => break,
                }
                if after_word {
                    continue;
                }
            } else {
                pos = end;
            }
            found.push((begin..end, c));
        }
        found
    }

    /// `re.sub(pattern, rep, s)`.
    pub(super) fn sub(&self, s: &str, mut rep: impl FnMut(&Captures) -> String) -> String {
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        for (span, c) in self.matches(s) {
            out.push_str(&s[last..span.start]);
            out.push_str(&rep(&c));
            last = span.end;
        }
        out.push_str(&s[last..]);
        out
    }

    /// `re.split(pattern, s)` (the pattern has no groups).
    pub(super) fn split<'h>(&self, s: &'h str) -> Vec<&'h str> {
        let mut pieces = Vec::new();
        let mut last = 0;
        for (span, _) in self.matches(s) {
            pieces.push(&s[last..span.start]);
            last = span.end;
        }
        pieces.push(&s[last..]);
        pieces
    }
}

/// `EnglishTextNormalizer.replacers`, in order: (pattern, `\b` before it, replacement); every
/// pattern has `\b` after it.
const REPLACERS: [(&str, bool, &str); 49] = [
    // common contractions
    ("won't", true, "will not"),
    ("can't", true, "can not"),
    ("let's", true, "let us"),
    ("ain't", true, "aint"),
    ("y'all", true, "you all"),
    ("wanna", true, "want to"),
    ("gotta", true, "got to"),
    ("gonna", true, "going to"),
    ("i'ma", true, "i am going to"),
    ("imma", true, "i am going to"),
    ("woulda", true, "would have"),
    ("coulda", true, "could have"),
    ("shoulda", true, "should have"),
    ("ma'am", true, "madam"),
    // contractions in titles/prefixes
    ("mr", true, "mister "),
    ("mrs", true, "missus "),
    ("st", true, "saint "),
    ("dr", true, "doctor "),
    ("prof", true, "professor "),
    ("capt", true, "captain "),
    ("gov", true, "governor "),
    ("ald", true, "alderman "),
    ("gen", true, "general "),
    ("sen", true, "senator "),
    ("rep", true, "representative "),
    ("pres", true, "president "),
    ("rev", true, "reverend "),
    ("hon", true, "honorable "),
    ("asst", true, "assistant "),
    ("assoc", true, "associate "),
    ("lt", true, "lieutenant "),
    ("col", true, "colonel "),
    ("jr", true, "junior "),
    ("sr", true, "senior "),
    ("esq", true, "esquire "),
    // perfect tenses
    ("'d been", false, " had been"),
    ("'s been", false, " has been"),
    ("'d gone", false, " had gone"),
    ("'s gone", false, " has gone"),
    ("'d done", false, " had done"),
    ("'s got", false, " has got"),
    // general contractions
    ("n't", false, " not"),
    ("'re", false, " are"),
    ("'s", false, " is"),
    ("'d", false, " would"),
    ("'ll", false, " will"),
    ("'t", false, " not"),
    ("'ve", false, " have"),
    ("'m", false, " am"),
];

/// Every compiled pattern of `EnglishTextNormalizer.__call__`.
struct Rules {
    brackets: Regex,
    parentheses: Regex,
    ignore: PyRe,
    space_apostrophe: Regex,
    replacers: Vec<(PyRe, &'static str)>,
    digit_comma: Regex,
    period: Regex,
    symbol: Regex,
    percent: Regex,
    spaces: Regex,
    numbers: numbers::Rules,
}

impl Rules {
    fn new() -> Option<Self> {
        let replacers = REPLACERS.iter().map(|&(p, start, r)| Some((PyRe::new(p, start, true)?, r))).collect::<Option<_>>()?;
        Some(Rules {
            brackets: Regex::new(r"[<\[][^>\]]*[>\]]").ok()?,
            parentheses: Regex::new(r"\(([^)]+?)\)").ok()?,
            ignore: PyRe::new("hmm|mm|mhm|mmm|uh|um", true, true)?,
            space_apostrophe: Regex::new(r"[\s\x1c-\x1f]+'").ok()?,
            replacers,
            digit_comma: Regex::new(r"(\d),(\d)").ok()?,
            period: Regex::new(r"\.([^0-9]|$)").ok()?,
            symbol: Regex::new("[.$¢€£]([^0-9])").ok()?,
            percent: Regex::new("([^0-9])%").ok()?,
            spaces: Regex::new(r"[\s\x1c-\x1f]+").ok()?,
            numbers: numbers::Rules::new()?,
        })
    }
}

/// The compiled rules (`None` only if a constant pattern were invalid, which the unit tests rule
/// out).
fn rules() -> Option<&'static Rules> {
    static RULES: OnceLock<Option<Rules>> = OnceLock::new();
    RULES.get_or_init(Rules::new).as_ref()
}

/// `EnglishTextNormalizer.__call__`.
fn whisper_en(s: &str, r: &Rules) -> String {
    let s = s.to_lowercase();
    let s = r.brackets.replace_all(&s, ""); // remove words between brackets
    let s = r.parentheses.replace_all(&s, ""); // remove words between parentheses
    let s = r.ignore.sub(&s, |_| String::new()); // fillers
    let mut s = r.space_apostrophe.replace_all(&s, "'").into_owned();
    for (re, rep) in &r.replacers {
        s = re.sub(&s, |_| (*rep).to_owned());
    }
    let s = r.digit_comma.replace_all(&s, "${1}${2}"); // remove commas between digits
    let s = r.period.replace_all(&s, " ${1}"); // remove periods not followed by numbers
    let s = remove_symbols_and_diacritics(&s, ".%$¢€£"); // keep numeric symbols
    let s = numbers::normalize(&s, &r.numbers);
    let s = spellings(&s);
    // prefix/suffix symbols not next to a number
    let s = r.symbol.replace_all(&s, " ${1}");
    let s = r.percent.replace_all(&s, "${1} ");
    r.spaces.replace_all(&s, NoExpand(" ")).into_owned()
}

/// `ADDITIONAL_DIACRITICS`: letters that NFKD does not take apart.
fn additional_diacritic(c: char) -> Option<&'static str> {
    Some(match c {
        'œ' => "oe",
        'Œ' => "OE",
        'ø' => "o",
        'Ø' => "O",
        'æ' => "ae",
        'Æ' => "AE",
        'ß' => "ss",
        'ẞ' => "SS",
        'đ' | 'ð' => "d",
        'Đ' | 'Ð' => "D",
        'þ' | 'Þ' => "th",
        'ł' => "l",
        'Ł' => "L",
        _ => return None,
    })
}

/// basic.py's `remove_symbols_and_diacritics`: NFKD, then the characters of `keep` stay, the
/// extra table applies, nonspacing marks go and other marks, symbols and punctuation become a
/// space.
fn remove_symbols_and_diacritics(s: &str, keep: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.nfkd() {
        if keep.contains(c) {
            out.push(c);
        } else if let Some(r) = additional_diacritic(c) {
            out.push_str(r);
        } else if c.general_category() == GeneralCategory::NonspacingMark {
            // a diacritic: dropped
        } else if matches!(c.general_category_group(), GeneralCategoryGroup::Mark | GeneralCategoryGroup::Symbol | GeneralCategoryGroup::Punctuation) {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// `english.json`, British spelling to American.
fn spelling_map() -> &'static HashMap<String, String> {
    static MAP: OnceLock<HashMap<String, String>> = OnceLock::new();
    MAP.get_or_init(|| serde_json::from_str(include_str!("english.json")).unwrap_or_default())
}

/// `EnglishSpellingNormalizer.__call__`.
fn spellings(s: &str) -> String {
    let map = spelling_map();
    py_split(s).map(|w| map.get(w).map_or(w, String::as_str)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [Normalize::None, Normalize::WhisperEn] {
            assert_eq!(Normalize::parse(n.name()).unwrap(), n);
        }
        let err = Normalize::parse("basic").unwrap_err().to_string();
        assert!(err.contains("none") && err.contains("whisper-en"), "{err}");
        assert_eq!(Normalize::None.apply(" Mr. X "), " Mr. X ");
    }

    #[test]
    fn rules_and_spellings_load() {
        assert!(rules().is_some());
        assert_eq!(spelling_map().len(), 1739);
        assert_eq!(spellings("the colour  of aeons"), "the color of eons");
    }

    #[test]
    fn python_word_boundaries() {
        let re = PyRe::new("um", true, true).unwrap();
        // a combining mark is no word character in Python, so "um" + U+0301 ends at a boundary
        assert_eq!(re.sub("um\u{301} xum um_ um \u{301}um", |_| "X".into()), "X\u{301} xum um_ X \u{301}X");
        let mm = PyRe::new("mm|mmm", true, true).unwrap();
        assert_eq!(mm.sub("mmm mm", |_| "X".into()), "X X");
        let half = PyRe::new(r"and[\s\x1c-\x1f]+a[\s\x1c-\x1f]+half", true, true).unwrap();
        assert_eq!(half.split("one and a half x\x1cand a\x1chalf"), ["one ", " x\x1c", ""]);
    }

    #[test]
    fn symbols_and_diacritics() {
        assert_eq!(remove_symbols_and_diacritics("café Øre ß $5% ‿ ½", ".%$"), "cafe Ore ss $5%   1 2");
    }
}

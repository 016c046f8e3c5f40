//! Corpus BLEU as sacreBLEU 2.6 computes it (`sacrebleu/metrics/bleu.py`, defaults of
//! `corpus_bleu`): one reference per segment, mixed case, 4-gram, `exp` smoothing, no effective
//! order; n-gram matches and lengths summed over the corpus, then one score. The tokenizers are
//! ports of `sacrebleu/tokenizers/`: `13a` (mteval-v13a, the default), `zh`, `char`, `intl`
//! and `none`. Korean and Japanese need mecab dictionaries sacreBLEU downloads; use `char` for
//! them and say so with the signature.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use super::{py_space, py_split, py_strip};
use crate::error::{Error, Result};

/// sacreBLEU's tokenizers that phi4mm reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BleuTokenize {
    /// mteval-v13a: punctuation and symbols split off, `.`/`,` kept inside numbers.
    V13a,
    /// Each CJK character a token, the rest as v13a's regular expressions.
    Zh,
    /// Every character a token (whitespace dropped).
    Char,
    /// mteval-v14 international: Unicode punctuation and symbols split off.
    Intl,
    /// Whitespace split only.
    None,
}

impl BleuTokenize {
    /// The name sacreBLEU's signature and `--tokenize` use.
    pub fn name(self) -> &'static str {
        match self {
            BleuTokenize::V13a => "13a",
            BleuTokenize::Zh => "zh",
            BleuTokenize::Char => "char",
            BleuTokenize::Intl => "intl",
            BleuTokenize::None => "none",
        }
    }

    /// Parses a sacreBLEU tokenizer name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "13a" => BleuTokenize::V13a,
            "zh" => BleuTokenize::Zh,
            "char" => BleuTokenize::Char,
            "intl" => BleuTokenize::Intl,
            "none" => BleuTokenize::None,
            _ => return Err(Error::Request(format!("unknown BLEU tokenizer `{s}`: use 13a, zh, char, intl or none"))),
        })
    }

    /// `line` tokenized, tokens separated by single spaces.
    fn tokenize(self, line: &str) -> String {
        match self {
            BleuTokenize::V13a => v13a(line),
            BleuTokenize::Zh => zh(line),
            BleuTokenize::Char => line.chars().map(String::from).collect::<Vec<_>>().join(" "),
            BleuTokenize::Intl => intl(line),
            BleuTokenize::None => line.to_owned(),
        }
    }
}

/// A corpus BLEU score with what produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    /// 0–100.
    pub score: f64,
    /// Hypothesis tokens over the corpus.
    pub sys_len: usize,
    /// Reference tokens over the corpus.
    pub ref_len: usize,
    /// sacreBLEU's signature of these settings, e.g.
    /// `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`.
    pub signature: String,
}

/// The sacreBLEU version whose definitions [`corpus_bleu`] follows (its signature's `version`).
pub const SACREBLEU_VERSION: &str = "2.6.0";

const MAX_ORDER: usize = 4;

/// Corpus BLEU of `(reference, hypothesis)` pairs, one reference each.
pub fn corpus_bleu<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>, tok: BleuTokenize) -> Bleu {
    let (mut correct, mut total) = ([0usize; MAX_ORDER], [0usize; MAX_ORDER]);
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (r, h) in pairs {
        // sacreBLEU strips trailing whitespace before tokenizing (`_preprocess_segment`).
        let (r, h) = (tok.tokenize(r.trim_end_matches(py_space)), tok.tokenize(h.trim_end_matches(py_space)));
        let (r, h): (Vec<&str>, Vec<&str>) = (py_split(&r).collect(), py_split(&h).collect());
        sys_len += h.len();
        ref_len += r.len();
        let ref_counts = ngrams(&r);
        for (g, c) in ngrams(&h) {
            total[g.len() - 1] += c;
            correct[g.len() - 1] += c.min(ref_counts.get(&g).copied().unwrap_or(0));
        }
    }
    let signature = format!("nrefs:1|case:mixed|eff:no|tok:{}|smooth:exp|version:{SACREBLEU_VERSION}", tok.name());
    Bleu { score: score(&correct, &total, sys_len, ref_len), sys_len, ref_len, signature }
}

/// Every n-gram of `tokens` for n = 1..=4, with its count.
fn ngrams<'t>(tokens: &[&'t str]) -> HashMap<Vec<&'t str>, usize> {
    let mut m = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *m.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    m
}

/// `BLEU.compute_bleu` with `exp` smoothing: a zero-match order n gets precision
/// 100 / (2^k · total_n), k counting the zero orders so far; an order with no n-grams at all
/// ends the loop and its precision stays 0 (log floored at −9999999999).
fn score(correct: &[usize; MAX_ORDER], total: &[usize; MAX_ORDER], sys_len: usize, ref_len: usize) -> f64 {
    if correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    let bp = match (sys_len < ref_len, sys_len) {
        (false, _) => 1.0,
        (true, 0) => 0.0,
        (true, s) => (1.0 - ref_len as f64 / s as f64).exp(),
    };
    let mut precisions = [0.0f64; MAX_ORDER];
    let mut smooth = 1.0f64;
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * total[n] as f64)
        } else {
            100.0 * correct[n] as f64 / total[n] as f64
        };
    }
    let logs: f64 = precisions.iter().map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() }).sum();
    bp * (logs / MAX_ORDER as f64).exp()
}

/// The four substitutions of `TokenizerRegexp` (shared by 13a and zh), then a whitespace split.
fn regexp_post(line: &str) -> String {
    static RULES: OnceLock<Option<Vec<(Regex, &'static str)>>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        compile(&[
            // ASCII punctuation and symbols except `'`, `-`, `.`, `,` (the ranges {-~, [-`, space-&, (-+, :-@ and /).
            (r"([\{-~\[-` -&\(-\+:-@/])", " $1 "),
            // Period and comma unless preceded by a digit ...
            (r"([^0-9])([\.,])", "$1 $2 "),
            // ... and unless followed by a digit.
            (r"([\.,])([^0-9])", " $1 $2"),
            // A dash after a digit.
            (r"([0-9])(-)", "$1 $2 "),
        ])
    });
    substitute(rules, line)
}

/// Compiled `(pattern, replacement)` rules (`None` only if a constant pattern were invalid, which
/// the unit tests rule out).
fn compile(rules: &[(&str, &'static str)]) -> Option<Vec<(Regex, &'static str)>> {
    rules.iter().map(|&(p, r)| Some((Regex::new(p).ok()?, r))).collect()
}

/// Every rule applied in order over the whole line (Python's `re.sub`), then a whitespace split
/// joined by single spaces.
fn substitute(rules: &Option<Vec<(Regex, &'static str)>>, line: &str) -> String {
    let mut s = line.to_owned();
    for (re, rep) in rules.iter().flatten() {
        s = re.replace_all(&s, *rep).into_owned();
    }
    py_split(&s).collect::<Vec<_>>().join(" ")
}

/// `Tokenizer13a`: drop `<skipped>`, join hyphenated line breaks, unescape four HTML entities,
/// pad with spaces, then [`regexp_post`].
fn v13a(line: &str) -> String {
    let mut s = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if s.contains('&') {
        s = s.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    regexp_post(&format!(" {s} "))
}

/// `TokenizerZh`: strip, put spaces around every character of its `_UCODE_RANGES`, then
/// [`regexp_post`] (no entity handling, no padding).
fn zh(line: &str) -> String {
    let mut s = String::with_capacity(line.len() * 2);
    for c in py_strip(line).chars() {
        if is_zh_char(c) {
            s.push(' ');
            s.push(c);
            s.push(' ');
        } else {
            s.push(c);
        }
    }
    regexp_post(&s)
}

/// sacreBLEU's `_UCODE_RANGES`, as Python evaluates them. Two of its entries are written
/// `'\u20000'`–`'\u2a6d6'` and `'\u2f800'`–`'\u2fa1d'`: Python reads `\u` with four hex digits,
/// so these are two-character strings, and comparing a character against them as strings makes
/// the ranges U+2001..=U+2A6D and U+2F81..=U+2FA1 — which, for instance, includes the em dash.
const ZH_RANGES: [(u32, u32); 22] = [
    (0x3400, 0x4db5),
    (0x4e00, 0x9fa5),
    (0x9fa6, 0x9fbb),
    (0xf900, 0xfa2d),
    (0xfa30, 0xfa6a),
    (0xfa70, 0xfad9),
    (0x2001, 0x2a6d),
    (0x2f81, 0x2fa1),
    (0xff00, 0xffef),
    (0x2e80, 0x2eff),
    (0x3000, 0x303f),
    (0x31c0, 0x31ef),
    (0x2f00, 0x2fdf),
    (0x2ff0, 0x2fff),
    (0x3100, 0x312f),
    (0x31a0, 0x31bf),
    (0xfe10, 0xfe1f),
    (0xfe30, 0xfe4f),
    (0x2600, 0x26ff),
    (0x2700, 0x27bf),
    (0x3200, 0x32ff),
    (0x3300, 0x33ff),
];

fn is_zh_char(c: char) -> bool {
    let u = c as u32;
    ZH_RANGES.iter().any(|&(a, b)| (a..=b).contains(&u))
}

/// `TokenizerV14International`: punctuation split off unless between digits, symbols split off.
fn intl(line: &str) -> String {
    static RULES: OnceLock<Option<Vec<(Regex, &'static str)>>> = OnceLock::new();
    let rules = RULES.get_or_init(|| compile(&[(r"(\P{N})(\p{P})", "$1 $2 "), (r"(\p{P})(\P{N})", " $1 $2"), (r"(\p{S})", " $1 ")]));
    substitute(rules, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v13a_keeps_numbers_whole_and_splits_punctuation() {
        assert_eq!(v13a("It costs $3.50, or 1,000 won."), "It costs $ 3.50 , or 1,000 won .");
        assert_eq!(v13a("pages 10-12 &amp; <skipped>x"), "pages 10 - 12 & x");
    }

    #[test]
    fn zh_splits_cjk_and_the_em_dash() {
        assert_eq!(zh("他说ok—好"), "他 说 ok — 好");
    }

    #[test]
    fn identical_corpus_scores_100_and_disjoint_scores_0() {
        let same = corpus_bleu([("a b c d e", "a b c d e")], BleuTokenize::V13a);
        assert!((same.score - 100.0).abs() < 1e-9, "{same:?}");
        assert_eq!(corpus_bleu([("a b c d", "x y z w")], BleuTokenize::V13a).score, 0.0);
    }
}

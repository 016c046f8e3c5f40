//! Whisper's `EnglishNumberNormalizer` (whisper/normalizers/english.py, MIT, see
//! `WHISPER-LICENSE`): spelled-out numbers to digits, ordinals and plurals kept as suffixes,
//! currency words to symbols before the number, `percent` to `%`. Part of
//! [`Normalize::WhisperEn`](super::Normalize); the module doc there lists the deviations.
//!
//! Python keeps a number as an `int` (arbitrary precision) or as the string being built, and
//! reads decimals with `fractions.Fraction`. Here an integer is its canonical decimal digits and
//! the few operations `process_words` does on one (`% 10`, `% 100`, `+ n`, and
//! `v // 1000 * 1000 + v % 1000 * 10**k` for a multiplier, always a power of ten) are done on
//! the digits, so every result is exact however long the number.

use regex::{Captures, Regex};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

use super::normalize::PyRe;
use super::{py_split, py_strip};

const ONES: [&str; 19] =
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"];
const TENS: [&str; 8] = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];
/// Each multiplier with its power of ten.
const MULTIPLIERS: [(&str, usize); 12] = [
    ("hundred", 2),
    ("thousand", 3),
    ("million", 6),
    ("billion", 9),
    ("trillion", 12),
    ("quadrillion", 15),
    ("quintillion", 18),
    ("sextillion", 21),
    ("septillion", 24),
    ("octillion", 27),
    ("nonillion", 30),
    ("decillion", 33),
];
/// Python's `self.prefixes`: the signs a number token may start with.
const PREFIXES: [char; 6] = ['-', '+', '£', '€', '$', '¢'];

/// One word of `self.words`, by the set `process_words` finds it in (the sets are disjoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Zero,
    One(u32),
    OneSuffixed(u32, &'static str),
    Ten(u32),
    TenSuffixed(u32, &'static str),
    Multiplier(usize),
    MultiplierSuffixed(usize, &'static str),
    /// `minus`, `plus`, ...: the sign they put before the next number.
    Preceding(char),
    /// `dollars`, `cents`, ...: the symbol they put before the number just said.
    Following(char),
    Per,
    Percent,
    And,
    Double,
    Triple,
    Point,
}

fn classify(w: &str) -> Option<Word> {
    let found = match w {
        "o" | "oh" | "zero" => Word::Zero,
        "minus" | "negative" => Word::Preceding('-'),
        "plus" | "positive" => Word::Preceding('+'),
        "pound" | "pounds" => Word::Following('£'),
        "euro" | "euros" => Word::Following('€'),
        "dollar" | "dollars" => Word::Following('$'),
        "cent" | "cents" => Word::Following('¢'),
        "per" => Word::Per,
        "percent" => Word::Percent,
        "and" => Word::And,
        "double" => Word::Double,
        "triple" => Word::Triple,
        "point" => Word::Point,
        _ => return spelled(w),
    };
    Some(found)
}

/// The number words proper: ones, tens and multipliers with their plural and ordinal forms,
/// spelled by english.py's rules (so `nineth`, not `ninth`, and `sixes`).
fn spelled(w: &str) -> Option<Word> {
    for (v, name) in (1u32..).zip(ONES) {
        let plural = if name == "six" { w == "sixes" } else { w.strip_suffix('s') == Some(name) };
        let ordinal = v > 3 && v != 5 && v != 12 && w.strip_prefix(name) == Some(if name.ends_with('t') { "h" } else { "th" });
        match () {
            _ if w == name => return Some(Word::One(v)),
            _ if plural => return Some(Word::OneSuffixed(v, "s")),
            _ if ordinal => return Some(Word::OneSuffixed(v, "th")),
            _ => {}
        }
    }
    let irregular = match w {
        "zeroth" => Some((0, "th")),
        "first" => Some((1, "st")),
        "second" => Some((2, "nd")),
        "third" => Some((3, "rd")),
        "fifth" => Some((5, "th")),
        "twelfth" => Some((12, "th")),
        _ => None,
    };
    if let Some((v, suffix)) = irregular {
        return Some(Word::OneSuffixed(v, suffix));
    }
    for (v, name) in (20u32..).step_by(10).zip(TENS) {
        match () {
            _ if w == name => return Some(Word::Ten(v)),
            _ if w == name.replace('y', "ies") => return Some(Word::TenSuffixed(v, "s")),
            _ if w == name.replace('y', "ieth") => return Some(Word::TenSuffixed(v, "th")),
            _ => {}
        }
    }
    let (name, k) = MULTIPLIERS.iter().find(|(name, _)| w.starts_with(name))?;
    match &w[name.len()..] {
        "" => Some(Word::Multiplier(*k)),
        "s" => Some(Word::MultiplierSuffixed(*k, "s")),
        "th" => Some(Word::MultiplierSuffixed(*k, "th")),
        _ => None,
    }
}

/// The compiled patterns of `preprocess`, `process_words` and `postprocess`.
pub(super) struct Rules {
    and_a_half: PyRe,
    letter_digit: Regex,
    digit_letter: Regex,
    suffix: PyRe,
    numeric: Regex,
    combine_cents: PyRe,
    extract_cents: PyRe,
    one: PyRe,
}

impl Rules {
    /// `None` only if a constant pattern were invalid (the unit tests rule that out).
    pub(super) fn new() -> Option<Self> {
        Some(Rules {
            and_a_half: PyRe::new(r"and[\s\x1c-\x1f]+a[\s\x1c-\x1f]+half", true, true)?,
            letter_digit: Regex::new("([a-z])([0-9])").ok()?,
            digit_letter: Regex::new("([0-9])([a-z])").ok()?,
            suffix: PyRe::new(r"([0-9])[\s\x1c-\x1f]+(st|nd|rd|th|s)", false, true)?,
            numeric: Regex::new(r"^\d+(?:\.\d+)?\z").ok()?,
            combine_cents: PyRe::new("([€£$])([0-9]+) (?:and )?¢([0-9]{1,2})", false, true)?,
            extract_cents: PyRe::new("[€£$]0.([0-9]{1,2})", false, true)?,
            one: PyRe::new("1(s?)", true, true)?,
        })
    }
}

/// `EnglishNumberNormalizer.__call__`.
pub(super) fn normalize(s: &str, r: &Rules) -> String {
    let s = preprocess(s, r);
    let words: Vec<&str> = py_split(&s).collect();
    postprocess(&process_words(&words, r).join(" "), r)
}

/// Group `i` of a match, empty when it took no part.
fn group<'h>(c: &Captures<'h>, i: usize) -> &'h str {
    c.get(i).map_or("", |m| m.as_str())
}

/// "<number> and a half" to "<number> point five", a space at letter/digit boundaries, none
/// before a suffix.
fn preprocess(s: &str, r: &Rules) -> String {
    let segments = r.and_a_half.split(s);
    let mut results = Vec::with_capacity(2 * segments.len());
    for (i, segment) in segments.iter().enumerate() {
        if py_strip(segment).is_empty() {
            continue;
        }
        results.push(*segment);
        if i + 1 < segments.len() {
            let last_word = py_split(segment).last().unwrap_or("");
            let decimal_or_multiplier = matches!(classify(last_word), Some(Word::Zero | Word::One(_) | Word::Ten(_) | Word::Multiplier(_)));
            results.push(if decimal_or_multiplier { "point five" } else { "and a half" });
        }
    }
    let s = results.join(" ");
    let s = r.letter_digit.replace_all(&s, "${1} ${2}");
    let s = r.digit_letter.replace_all(&s, "${1} ${2}");
    r.suffix.sub(&s, |c| format!("{}{}", group(c, 1), group(c, 2)))
}

/// "$2 and ¢7" to "$2.07", "$0.5" to "¢5", a lone 1 to "one".
fn postprocess(s: &str, r: &Rules) -> String {
    let cents = |digits: &str| digits.parse::<u32>().unwrap_or(0);
    let s = r.combine_cents.sub(s, |c| format!("{}{}.{:02}", group(c, 1), group(c, 2), cents(group(c, 3))));
    let s = r.extract_cents.sub(&s, |c| format!("¢{}", cents(group(c, 1))));
    r.one.sub(&s, |c| format!("one{}", group(c, 1)))
}

/// Python's `value`: an `int` (canonical ASCII digits) or the `str` being built.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Int(String),
    Str(String),
}

impl Value {
    /// `str(value)`.
    fn text(&self) -> &str {
        match self {
            Value::Int(s) | Value::Str(s) => s,
        }
    }
}

/// The state of one `process_words` pass and what it yielded.
#[derive(Default)]
struct State {
    prefix: Option<char>,
    value: Option<Value>,
    out: Vec<String>,
}

impl State {
    /// `yield output(result)`: the pending prefix before `result`; value and prefix cleared.
    fn output(&mut self, result: &str) {
        let mut r = self.prefix.take().map(String::from).unwrap_or_default();
        r.push_str(result);
        self.value = None;
        self.out.push(r);
    }

    /// `if value is not None: yield output(value)`.
    fn flush(&mut self) {
        if let Some(v) = self.value.take() {
            self.output(v.text());
        }
    }

    /// `str(value or "")` (an int 0 is falsy).
    fn truthy(&self) -> &str {
        match &self.value {
            Some(Value::Int(d)) if d == "0" => "",
            Some(v) => v.text(),
            None => "",
        }
    }
}

/// The neighbours of the word at hand, as `windowed([None] + words + [None], 3)` gives them.
struct Around<'a> {
    prev: Option<Word>,
    next: Option<&'a str>,
    next_word: Option<Word>,
    next_is_numeric: bool,
}

/// `EnglishNumberNormalizer.process_words`.
fn process_words(words: &[&str], r: &Rules) -> Vec<String> {
    let mut st = State::default();
    let mut skip = false;
    for (i, &current) in words.iter().enumerate() {
        if std::mem::take(&mut skip) {
            continue;
        }
        let next = words.get(i + 1).copied();
        let around = Around { prev: i.checked_sub(1).and_then(|j| classify(words[j])), next, next_word: next.and_then(classify), next_is_numeric: next.is_some_and(|n| r.numeric.is_match(n)) };
        skip = step(&mut st, current, &around, r);
    }
    st.flush();
    st.out
}

/// One iteration of the loop; true when the next word is consumed too (`skip = True`).
fn step(st: &mut State, current: &str, a: &Around, r: &Rules) -> bool {
    let first = current.chars().next().filter(|c| PREFIXES.contains(c));
    let bare = first.map_or(current, |c| &current[c.len_utf8()..]);
    if r.numeric.is_match(bare) {
        arabic(st, current, bare, first);
        return false;
    }
    let Some(word) = classify(current) else {
        st.flush();
        st.output(current);
        return false;
    };
    match word {
        Word::Zero => st.value = Some(Value::Str(format!("{}0", st.truthy()))),
        Word::One(n) => st.value = Some(ones(st.value.take(), n, a.prev)),
        Word::OneSuffixed(n, suffix) => {
            let v = ones(st.value.take(), n, a.prev);
            st.output(&format!("{}{suffix}", v.text()));
        }
        Word::Ten(n) => st.value = Some(tens(st.value.take(), n)),
        Word::TenSuffixed(n, suffix) => {
            let v = tens(st.value.take(), n);
            st.output(&format!("{}{suffix}", v.text()));
        }
        Word::Multiplier(k) => multiplier(st, k),
        Word::MultiplierSuffixed(k, suffix) => multiplier_suffixed(st, k, suffix),
        Word::Preceding(sign) => {
            st.flush();
            if a.next_word.is_some() || a.next_is_numeric {
                st.prefix = Some(sign);
            } else {
                st.output(current);
            }
        }
        Word::Following(symbol) => match st.value.take() {
            Some(v) => {
                st.prefix = Some(symbol);
                st.output(v.text());
            }
            None => st.output(current),
        },
        Word::Per | Word::Percent => return suffixer(st, current, word, a),
        Word::And | Word::Double | Word::Triple | Word::Point => return special(st, current, word, a),
    }
    false
}

/// A number in digits, possibly after a sign: decimals and IP-address parts after a `point`
/// are glued on, integers kept as ints.
fn arabic(st: &mut State, current: &str, bare: &str, sign: Option<char>) {
    if let Some(v) = st.value.take() {
        if let Value::Str(s) = &v {
            if s.ends_with('.') {
                st.value = Some(Value::Str(format!("{s}{current}")));
                return;
            }
        }
        st.output(v.text());
    }
    if sign.is_some() {
        st.prefix = sign;
    }
    st.value = Some(match to_fraction(bare) {
        Some((int, frac)) if frac.bytes().all(|b| b == b'0') => Value::Int(canonical(&int)),
        _ => Value::Str(bare.to_owned()),
    });
}

/// The value after a one (1..19); english.py yields it at once for an ordinal or plural.
fn ones(value: Option<Value>, n: u32, prev: Option<Word>) -> Value {
    let prev_one = matches!(prev, Some(Word::One(_)));
    match value {
        None => Value::Int(n.to_string()),
        Some(Value::Str(s)) if matches!(prev, Some(Word::Ten(_))) && n < 10 => {
            // replace the last zero with the digit (the tens word just wrote one)
            let mut s = s;
            s.pop();
            Value::Str(format!("{s}{n}"))
        }
        Some(Value::Str(s)) => Value::Str(format!("{s}{n}")),
        Some(Value::Int(d)) if prev_one => Value::Str(format!("{d}{n}")),
        Some(Value::Int(d)) => {
            let modulus = if n < 10 { 1 } else { 2 };
            if last_digits(&d, modulus) == 0 {
                Value::Int(add(&d, &n.to_string()))
            } else {
                Value::Str(format!("{d}{n}"))
            }
        }
    }
}

/// The value after a tens word (20..90).
fn tens(value: Option<Value>, n: u32) -> Value {
    match value {
        None => Value::Int(n.to_string()),
        Some(Value::Str(s)) => Value::Str(format!("{s}{n}")),
        Some(Value::Int(d)) if last_digits(&d, 2) == 0 => Value::Int(add(&d, &n.to_string())),
        Some(Value::Int(d)) => Value::Str(format!("{d}{n}")),
    }
}

/// `hundred`, `thousand`, ...: scale the value said so far.
fn multiplier(st: &mut State, k: usize) {
    st.value = Some(Value::Int(match st.value.take() {
        None => pow10(k),
        Some(Value::Int(d)) if d != "0" => times_multiplier(&d, k),
        Some(v) => match to_fraction(v.text()).and_then(|(int, frac)| scaled(&int, &frac, k)) {
            Some(d) => d,
            None => {
                st.output(v.text());
                pow10(k)
            }
        },
    }));
}

/// `hundredth`, `thousands`, ...: scale the value said so far and yield it with the suffix.
fn multiplier_suffixed(st: &mut State, k: usize, suffix: &str) {
    match st.value.take() {
        None => st.output(&format!("{}{suffix}", pow10(k))),
        Some(Value::Str(s)) => match to_fraction(&s).and_then(|(int, frac)| scaled(&int, &frac, k)) {
            Some(d) => st.output(&format!("{d}{suffix}")),
            None => {
                st.output(&s);
                st.output(&format!("{}{suffix}", pow10(k)));
            }
        },
        Some(Value::Int(d)) => st.output(&format!("{}{suffix}", times_multiplier(&d, k))),
    }
}

/// `percent` and `per cent` after a number.
fn suffixer(st: &mut State, current: &str, word: Word, a: &Around) -> bool {
    let Some(v) = st.value.take() else {
        st.output(current);
        return false;
    };
    if word == Word::Percent || a.next == Some("cent") {
        st.output(&format!("{}%", v.text()));
        return word == Word::Per;
    }
    st.output(v.text());
    st.output(current);
    false
}

/// `and`, `double`, `triple`, `point`: only when the next word can be part of a number.
fn special(st: &mut State, current: &str, word: Word, a: &Around) -> bool {
    let next_digit = match a.next_word {
        Some(Word::One(n)) => Some(n),
        Some(Word::Zero) => Some(0),
        _ => None,
    };
    let literal = match word {
        _ if a.next_word.is_none() && !a.next_is_numeric => true,
        Word::And => !matches!(a.prev, Some(Word::Multiplier(_))),
        Word::Double | Word::Triple => match next_digit {
            Some(n) => {
                let repeats = if word == Word::Double { 2 } else { 3 };
                st.value = Some(Value::Str(format!("{}{}", st.truthy(), n.to_string().repeat(repeats))));
                return true;
            }
            None => true,
        },
        _ => {
            if matches!(a.next_word, Some(Word::Zero | Word::One(_) | Word::Ten(_))) || a.next_is_numeric {
                st.value = Some(Value::Str(format!("{}.", st.truthy())));
            }
            false
        }
    };
    if literal {
        st.flush();
        st.output(current);
    }
    false
}

/// The value of a Unicode decimal digit (what Python's `int()` reads): decimal digits come in
/// runs of whole sets 0..9, so it is the offset in its run of consecutive digits modulo 10.
fn digit_value(c: char) -> Option<u32> {
    if c.is_ascii_digit() {
        return c.to_digit(10);
    }
    if c.general_category() != GeneralCategory::DecimalNumber {
        return None;
    }
    let mut offset = 0;
    let mut cp = c as u32;
    while let Some(p) = cp.checked_sub(1).and_then(char::from_u32) {
        if p.general_category() != GeneralCategory::DecimalNumber {
            break;
        }
        offset += 1;
        cp -= 1;
    }
    Some(offset % 10)
}

/// `s` in ASCII digits when every character is a decimal digit.
fn ascii_digits(s: &str) -> Option<String> {
    s.chars().map(|c| digit_value(c).and_then(|d| char::from_digit(d, 10))).collect()
}

/// `Fraction(s)` as (integer digits, fraction digits), both ASCII, or `None` where Python raises
/// `ValueError`. The strings english.py hands it are built of decimal digits, `.` and currency
/// signs, where Fraction's grammar comes down to `\d*(\.\d*)?` starting with a digit or `.\d`.
fn to_fraction(s: &str) -> Option<(String, String)> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let (int, frac) = (ascii_digits(int)?, ascii_digits(frac)?);
    (!int.is_empty() || !frac.is_empty()).then_some((int, frac))
}

/// `int.frac * 10**k` when it is an integer.
fn scaled(int: &str, frac: &str, k: usize) -> Option<String> {
    let frac = frac.trim_end_matches('0');
    (frac.len() <= k).then(|| canonical(&format!("{int}{frac}{}", "0".repeat(k - frac.len()))))
}

/// Digits without leading zeros ("0" for none).
fn canonical(d: &str) -> String {
    let t = d.trim_start_matches('0');
    if t.is_empty() { "0" } else { t }.to_owned()
}

fn pow10(k: usize) -> String {
    format!("1{}", "0".repeat(k))
}

/// `v % 10**n` for n ≤ 3.
fn last_digits(v: &str, n: usize) -> u32 {
    v.bytes().rev().take(n).rev().fold(0, |acc, b| acc * 10 + u32::from(b - b'0'))
}

/// `v // 1000 * 1000 + v % 1000 * 10**k`.
fn times_multiplier(v: &str, k: usize) -> String {
    let cut = v.len().saturating_sub(3);
    let before = if cut == 0 { "0".to_owned() } else { format!("{}000", &v[..cut]) };
    let residual = last_digits(v, 3);
    let scaled = if residual == 0 { "0".to_owned() } else { format!("{residual}{}", "0".repeat(k)) };
    add(&before, &scaled)
}

/// The sum of two canonical digit strings.
fn add(a: &str, b: &str) -> String {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut out = Vec::with_capacity(a.len().max(b.len()) + 1);
    let mut carry = 0;
    for i in 0..a.len().max(b.len()) {
        let da = a.len().checked_sub(i + 1).map_or(0, |j| a[j] - b'0');
        let db = b.len().checked_sub(i + 1).map_or(0, |j| b[j] - b'0');
        let s = da + db + carry;
        out.push(b'0' + s % 10);
        carry = s / 10;
    }
    if carry > 0 {
        out.push(b'0' + carry);
    }
    out.iter().rev().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_sets_follow_english_py() {
        assert_eq!(classify("nineth"), Some(Word::OneSuffixed(9, "th")));
        assert_eq!(classify("ninth"), None);
        assert_eq!(classify("eighth"), Some(Word::OneSuffixed(8, "th")));
        assert_eq!(classify("sixes"), Some(Word::OneSuffixed(6, "s")));
        assert_eq!(classify("sixs"), None);
        assert_eq!(classify("tens"), Some(Word::OneSuffixed(10, "s")));
        assert_eq!(classify("forties"), Some(Word::TenSuffixed(40, "s")));
        assert_eq!(classify("ninetieth"), Some(Word::TenSuffixed(90, "th")));
        assert_eq!(classify("decillionth"), Some(Word::MultiplierSuffixed(33, "th")));
        assert_eq!(classify("hundreds"), Some(Word::MultiplierSuffixed(2, "s")));
        assert_eq!(classify("hundredz"), None);
        assert_eq!(classify("cent"), Some(Word::Following('¢')));
    }

    #[test]
    fn big_integers_are_exact() {
        assert_eq!(add("999", "1"), "1000");
        assert_eq!(add("0", "0"), "0");
        assert_eq!(times_multiplier("12345", 3), "357000"); // as Python: 12000 + 345 * 1000
        assert_eq!(times_multiplier("2", 33), format!("2{}", "0".repeat(33)));
        assert_eq!(times_multiplier("1000", 2), "1000");
        assert_eq!(last_digits("120", 2), 20);
        assert_eq!(scaled("3", "14159", 3), None);
        assert_eq!(scaled("0", "50", 1).as_deref(), Some("5"));
        assert_eq!(to_fraction("."), None);
        assert_eq!(to_fraction(".5"), Some((String::new(), "5".to_owned())));
        assert_eq!(to_fraction("5."), Some(("5".to_owned(), String::new())));
        assert_eq!(to_fraction("1.2.3"), None);
        assert_eq!(to_fraction("3.$5"), None);
    }

    #[test]
    fn unicode_digits_have_their_values() {
        assert_eq!(digit_value('\u{663}'), Some(3));
        assert_eq!(digit_value('\u{96f}'), Some(9));
        assert_eq!(digit_value('\u{1d7d7}'), Some(9)); // mathematical bold nine, fifth set of a run of 50
        assert_eq!(digit_value('x'), None);
        // the rule digit_value relies on: every run of consecutive decimal digits is whole sets
        let mut run = 0;
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            if c.general_category() == GeneralCategory::DecimalNumber {
                run += 1;
            } else {
                assert_eq!(run % 10, 0, "digit run ending before {c:?}");
                run = 0;
            }
        }
    }

    #[test]
    fn rules_compile() {
        assert!(Rules::new().is_some());
    }
}

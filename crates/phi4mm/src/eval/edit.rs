//! Word and character error rates with jiwer 4.0's default transforms (`wer_default`,
//! `cer_default` in `jiwer/transformations.py`) and its corpus-level definition
//! (`jiwer/process.py`): the edits of every pair are summed and divided once by the reference
//! length summed over the set — not a mean of per-utterance rates.

use super::{py_space, py_strip};

/// Corpus word error rate: (S + D + I) / N over all pairs `(reference, prediction)`. Both sides
/// are transformed as jiwer's default does: runs of two or more whitespace characters become
/// one space, the ends are stripped, and words are split on the space character only (so a
/// single tab stays inside a word). When the references hold no word at all, jiwer returns
/// the number of inserted words instead of a fraction; so does this.
pub fn wer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    rate(pairs.into_iter().map(|(r, p)| (words(r), words(p))))
}

/// Corpus character error rate: the same over Unicode code points of the stripped strings
/// (spaces count, runs of spaces are kept), as jiwer's `cer_default`.
pub fn cer<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    rate(pairs.into_iter().map(|(r, p)| (py_strip(r).chars().collect::<Vec<_>>(), py_strip(p).chars().collect())))
}

fn rate<T: PartialEq>(pairs: impl Iterator<Item = (Vec<T>, Vec<T>)>) -> f64 {
    let (mut edits, mut ref_len) = (0usize, 0usize);
    for (r, p) in pairs {
        edits += levenshtein(&r, &p);
        ref_len += r.len();
    }
    if ref_len == 0 {
        // Every edit is then an insertion (jiwer's edge case for empty references).
        return edits as f64;
    }
    edits as f64 / ref_len as f64
}

/// jiwer's `RemoveMultipleSpaces` (`\s\s+` → one space), `Strip`, then a split on `" "` that
/// drops empty words.
fn words(s: &str) -> Vec<String> {
    let mut collapsed = String::with_capacity(s.len());
    let mut run = String::new();
    for c in s.chars() {
        if py_space(c) {
            run.push(c);
            continue;
        }
        flush_run(&mut collapsed, &mut run);
        collapsed.push(c);
    }
    flush_run(&mut collapsed, &mut run);
    py_strip(&collapsed).split(' ').filter(|w| !w.is_empty()).map(str::to_owned).collect()
}

/// A whitespace run of one character is kept as it is; two or more become one space.
fn flush_run(out: &mut String, run: &mut String) {
    if run.chars().count() >= 2 {
        out.push(' ');
    } else {
        out.push_str(run);
    }
    run.clear();
}

/// Edit distance (substitution, deletion, insertion all cost 1) between `a` and `b`, in one row
/// of memory.
fn levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = (diag + usize::from(x != y)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_rate_sums_edits_before_dividing() {
        // Per-utterance rates 1/1 and 0/3 average 0.5; the corpus rate is 1/4.
        assert_eq!(wer([("a", "b"), ("c d e", "c d e")]), 0.25);
        assert_eq!(levenshtein(b"kitten", b"sitting"), 3);
    }

    #[test]
    fn only_space_separates_words_after_runs_collapse() {
        assert_eq!(words(" a\tb  c "), ["a\tb", "c"]);
        assert_eq!(words("x\t\ty"), ["x", "y"]);
    }
}

#!/usr/bin/env python3
"""Expected values for phi4mm's evaluation metrics (crates/phi4mm/tests/metrics.rs).

Writes `fixtures/metrics/pairs.jsonl` (the tricky reference/prediction pairs below, one JSON object
per line, in the format `phi4mm eval --score` reads) and `fixtures/metrics/expected.json`: what
jiwer 4.0.0 (WER, CER with its default transforms) and sacreBLEU 2.6.0 (corpus BLEU with every
tokenizer phi4mm ports) compute on them, for the whole set and for named subsets.

    pip install jiwer==4.0.0 sacrebleu==2.6.0
    python3 reference/make_metrics.py
"""
import json
import os
from importlib.metadata import version

import jiwer
import sacrebleu

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "metrics")

# (reference, prediction). Each exercises one definition: corpus-level counts, jiwer's split on " "
# only (a tab is inside a word) after collapsing runs of any whitespace, CER counting spaces,
# empty strings on either side, punctuation and casing kept, CJK and Korean, numbers, HTML
# entities and `<skipped>` (13a), the dash after a digit, and a character that sacreBLEU's zh
# tokenizer treats as Chinese only because of how its ranges compare as strings (U+2014).
PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "the cat sat on mat"),
    ("hello world", "Hello, world!"),
    ("  leading and   trailing  ", "leading and trailing"),
    ("a\tb c", "a b c"),
    ("x\t\ty", "x y"),
    ("", ""),
    ("one two three", ""),
    ("他说今天天气很好", "他说今天天气真好"),
    ("我们 明天 去 北京", "我们明天去北京"),
    ("오늘 날씨가 좋네요", "오늘 날씨 좋네요"),
    ("it costs $3.50, or 1,000 won.", "it costs 3.50 dollars or 1000 won"),
    ("pages 10-12 and 2-3", "pages 10 - 12 and 2-3"),
    ("&quot;quoted&quot; &amp; <skipped> done", '"quoted" & done'),
    ("wait\u2014what?", "wait \u2014 what ?"),
    ("naïve café déjà vu", "naive cafe deja vu"),
    ("Dr. Smith's 2nd visit (at 3 p.m.)", "doctor smith's second visit at 3 pm"),
    ("full\u3000width\u00a0spaces", "full width spaces"),
    ("sep\x1carated", "sep arated"),
    ("ΟΔΟΣ Σ", "οδος σ"),
]

# Subsets scored on their own (indices into PAIRS).
SUBSETS = {
    "all": list(range(len(PAIRS))),
    "only_empty_refs": [6],
    "latin": [0, 1, 2, 3, 4, 5, 11, 12, 13, 16],
    "cjk": [8, 9, 10, 14],
    "no_match": [7],
}
# A set whose references are all empty: jiwer's WER (and CER) is then the count of inserted words
# (characters), not a fraction.
EMPTY_REFS = [("", "some words here"), ("", "")]

TOKENIZERS = ["13a", "zh", "char", "intl", "none"]


def bleu(refs, hyps, tok):
    b = sacrebleu.metrics.BLEU(tokenize=tok)
    s = b.corpus_score(hyps, [refs])
    return {"score": s.score, "signature": str(b.get_signature()), "sys_len": s.sys_len, "ref_len": s.ref_len}


def scores(pairs):
    refs = [r for r, _ in pairs]
    hyps = [h for _, h in pairs]
    out = {
        "n": len(pairs),
        "wer": float(jiwer.wer(refs, hyps)),
        "cer": float(jiwer.cer(refs, hyps)),
        "bleu": {t: bleu(refs, hyps, t) for t in TOKENIZERS},
    }
    return out


def main():
    os.makedirs(ROOT, exist_ok=True)
    with open(os.path.join(ROOT, "pairs.jsonl"), "w", encoding="utf-8") as f:
        for r, h in PAIRS:
            f.write(json.dumps({"reference": r, "prediction": h}, ensure_ascii=False) + "\n")
    expected = {
        "versions": {"jiwer": version("jiwer"), "sacrebleu": version("sacrebleu")},
        "subsets": {name: {"indices": idx, **scores([PAIRS[i] for i in idx])} for name, idx in SUBSETS.items()},
        "empty_refs": {"pairs": EMPTY_REFS, **scores(EMPTY_REFS)},
        "per_pair": [{"wer": float(jiwer.wer(r, h)), "cer": float(jiwer.cer(r, h))} for r, h in PAIRS],
    }
    with open(os.path.join(ROOT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for name, s in expected["subsets"].items():
        print(name, "wer", round(s["wer"], 4), "cer", round(s["cer"], 4), {t: round(b["score"], 3) for t, b in s["bleu"].items()})


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Expected values for phi4mm's Whisper English text normaliser (crates/phi4mm/tests/normalize.rs).

Runs OpenAI Whisper's `EnglishTextNormalizer` (the normaliser the Open ASR leaderboard applies
before WER) over the tricky inputs below and writes `fixtures/metrics/normalize.json`, a list of
`{"input": ..., "whisper_en": ...}` objects.

    pip install --no-deps openai-whisper==20250625 regex more-itertools
    python3 reference/make_normalize.py

Only `whisper/normalizers/` is loaded (by file, with importlib), so neither torch nor tiktoken
has to import: the normaliser needs only `regex` and `more_itertools`.
"""
import importlib.util
import json
import os
import sys
from importlib.metadata import version

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "metrics")

# Each line exercises one rule of english.py / basic.py: contractions and titles, the number
# normaliser (spelled numbers, ordinals, plurals, currencies, percent, decimals, "and a half",
# "double"/"triple", multipliers up to decillion, long digit runs, Python's arbitrary-precision
# ints and Fractions), fillers, brackets and parentheses, diacritics and the extra table, British
# spellings, periods, commas between digits, Python's whitespace and word-boundary classes, and
# scripts the normaliser leaves alone.
INPUTS = [
    # contractions, titles
    "I won't go, you can't stop me, let's see",
    "Y'all ain't gonna believe it, I wanna go, we gotta run",
    "I'ma do it, imma try, woulda coulda shoulda, yes ma'am",
    "He'd been there. She's gone. They'd done it. It's got legs.",
    "don't isn't they're he's we'd you'll can't've I'm",
    "Mr. Smith and Mrs. Jones met Dr. Who and Prof. X",
    "St. Louis, Capt. Hook, Gov. Brown, Ald. Kelly, Gen. Lee, Sen. Reed",
    "Rep. Ryan, Pres. Lincoln, Rev. King, Hon. Judge, Asst. Manager, Assoc. Dean",
    "Lt. Dan, Col. Sanders, John Jr. and John Sr., Jim Esq.",
    "it 's a dog , isn ' t it",
    "rock 'n' roll",
    "Mr Mrs Dr St",
    # spelled-out numbers
    "one oh one",
    "twenty one",
    "two and a half million",
    "three point one four",
    "double seven",
    "triple zero nine",
    "double oh seven",
    "a hundred and five",
    "one hundred and twenty three thousand four hundred and fifty six",
    "nineteen ninety nine",
    "twenty twenty one",
    "two thousand and five",
    "eleven hundred",
    "one twenty one",
    "zero zero seven",
    "0 point five",
    "point five",
    "five point thousand",
    "three point five million",
    "three point one four one five nine thousand",
    "one and a half",
    "and a half",
    "four and a half apples and a half",
    "minus five degrees and plus three",
    "negative twelve, positive two",
    "minus and cats",
    "one million and one",
    "a decillion",
    "two decillions",
    "seven hundred decillion",
    "a hundredth of a thousandth",
    "millions of billions",
    # ordinals, plurals
    "twenty first",
    "forty-second",
    "the fifth and the twelfth, the ninth and the nineth",
    "first second third fourth eighth zeroth",
    "one hundred and first",
    "sixes and sevens",
    "in the twenties and thirties",
    "the ones and the tens",
    "1st 2nd 3rd 4th 22nd 101st",
    "the 1960s and 70s",
    "1 s and 2 nd",
    "one, ones, 1s, 11",
    # money, percent
    "$20 million",
    "twenty dollars and five cents",
    "two dollars and seven cents",
    "five dollars fifty cents",
    "£3 and 50p",
    "€5 and ¢7",
    "$0.05 and $0.5",
    "$2.50",
    "fifty percent",
    "fifty per cent",
    "ten per",
    "per cent",
    "12% of 50 %",
    "100%",
    "one pound and twenty pence",
    "a dollar",
    # digits, decimals, separators
    "192 point 168 point 1 point 1",
    "3.0 and 3.50 and 007",
    "1,000,000 people",
    "1,2,3",
    "12345678901234567890123456789012345678901234567890",
    "12345678901234567890123456789012345678901234567890 thousand",
    "99999999999999999999999999999999999999 decillion",
    "3.5 thousand and 1.25 hundred",
    "pi is 3.14159",
    "5.5.5",
    "1.2.3.4 is an address",
    "version 2. then 3.x",
    "e.g. U.S.A. i.e. etc.",
    "a.b.c...d",
    "The end.",
    "$ alone and . alone and % alone",
    "abc123def 4five 6th",
    "10am 5pm",
    "\u0663 \u0664\u0665 \u0663.\u0665 thousand",
    "\uff11\uff12\uff13",
    "\u00bd and \u00b2 and \u2167",
    # fillers, brackets
    "um uh hmm mm mhm mmm well",
    "ummm uhh hmmm",
    "[noise] hello <unk> world (laughs) end",
    "[unclosed bracket and (unclosed paren",
    "a (b) c (d (e) f) g [h] i <j> k",
    "()[]<>",
    "um\u0301 uh",
    "e\u0301mr x\u0301um a\u0301st",
    # diacritics, spellings, scripts
    "café naïve Øre straße",
    "Œuvre Æsir Đorđe Ðiðrik Þór łódź",
    "\u1e9e \u210cello \ufb01ne",
    "colour organise behaviour realise theatre",
    "Colour. Organised!",
    "ΟΔΟΣ Σ",
    "İstanbul",
    "他说今天天气很好 123",
    "오늘 날씨가 좋네요",
    "emoji \U0001F600 \U0001F44D\U0001F3FD heart \u2764\ufe0f",
    "tab\tand\nnewline\r\nand\x0bvt",
    "sep\x1carated\x1f",
    "x\u203fy a_b",
    "full\u3000width\u00a0space",
    # whitespace, case, empty
    "",
    "   ",
    "  Leading and trailing  ",
    "MiXeD CaSe WoRdS",
    "What?! No... Yes; maybe: (perhaps) - 'quoted' \"double\"",
    "hyphen-ated and em\u2014dash",
]


def load_normalizer():
    """whisper/normalizers/ as a package of its own, without running whisper/__init__.py."""
    spec = importlib.util.find_spec("whisper")
    folder = os.path.join(os.path.dirname(spec.origin), "normalizers")
    spec = importlib.util.spec_from_file_location(
        "whisper_normalizers", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["whisper_normalizers"] = module
    spec.loader.exec_module(module)
    return module.EnglishTextNormalizer()


def main():
    normalize = load_normalizer()
    print("openai-whisper", version("openai-whisper"), "python", sys.version.split()[0])
    assert len(INPUTS) == len(set(INPUTS)), "duplicate input"
    cases = [{"input": s, "whisper_en": normalize(s)} for s in INPUTS]
    os.makedirs(ROOT, exist_ok=True)
    with open(os.path.join(ROOT, "normalize.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(len(cases), "cases")


if __name__ == "__main__":
    main()

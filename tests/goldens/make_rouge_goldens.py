"""The `rouge` package's ROUGE-L F on a corpus of (prediction, reference) pairs: the golden values of sample.rouge_l.

    python3 -m venv /tmp/rougevenv && /tmp/rougevenv/bin/pip install rouge==1.0.1
    cd /tmp && /tmp/rougevenv/bin/python /work/main/tests/goldens/make_rouge_goldens.py

The release's bench scorer (LLaVA-NeXT, llava/eval/evaluate_demon_new.py) scores open-ended answers with this package's
Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]. sample.py computes the same number itself, so that
neither the tests nor a user need the package; tests/test_bench.py checks that the two agree exactly on every pair
stored here in tests/goldens/rouge/rouge_l.json. The corpus: hand-made pairs for each trap (ties between longest
common subsequences, repeated words, empty strings and sentences, periods, which the package splits sentences at,
whitespace of every kind, non-ASCII text), then random pairs over a small vocabulary, where ties and repeats are
common. "f" is null where the package raises (a side with no sentence); the release scores those 0 before asking it.
"""
import json
import os
import random

import rouge

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rouge")

HAND_MADE = [
    ("a b c", "a b c"),
    ("a b c", "d e f"),
    ("a b c d", "a c"),
    ("the cat sat on the mat", "the cat is on the mat"),
    # ties: which LCS the package traces changes the union over sentences
    ("b a", "a b"),
    ("b a. a", "a b"),
    ("a b", "b a. b"),
    ("x y z. z y x", "z y x y z"),
    ("c b a. a b c", "a b c. c b a"),
    # repeated words: the package counts distinct words
    ("a a a", "a"),
    ("a", "a a a"),
    ("the the cat", "the cat the"),
    ("yes yes no", "no no yes"),
    # empty strings, empty and blank sentences
    ("", "a"),
    ("a", ""),
    ("", ""),
    ("...", "a"),
    ("a", "..."),
    (" . ", "a"),
    (" ", " "),
    ("a. . b", "a b"),
    ("a..b", "a b"),
    # periods: sentences
    ("3.5 apples", "3 5 apples"),
    ("a. b. c", "a b c"),
    ("one sentence. two sentence.", "two sentence. one sentence."),
    ("end.", "end"),
    (".start", "start"),
    # whitespace of every kind
    ("a\tb\nc", "a b c"),
    ("a  b   c", "a b c"),
    ("a\u00a0b", "a b"),
    ("a\u3000b c", "a b c"),
    # non-ASCII text
    ("café au lait", "cafe au lait"),
    ("café au lait", "café au lait"),
    ("你好 世界", "你好 世界 再见"),
    ("你好世界", "你好 世界"),
    ("naïve résumé", "résumé naïve"),
    ("straße", "strasse"),
    ("İstanbul ıı", "istanbul ii"),
    ("🙂 happy 🙂", "happy 🙂"),
    ("e\u0301 e", "\u00e9 e"),
]
VOCABULARY = ["a", "b", "c", "d", "the", "cat", "é", "猫", "1", "2"]
SEPARATORS = [" ", " ", " ", "  ", ". ", ".", "\t", " .", "\n"]


def random_text(rng):
    """A few words from a small vocabulary, joined by spaces, periods and other whitespace."""
    words = [rng.choice(VOCABULARY) for _ in range(rng.randint(0, 12))]
    text = ""
    for word in words:
        text += word + rng.choice(SEPARATORS)
    return text.strip() if rng.random() < 0.7 else text


def package_f(prediction, reference):
    """The package's "rouge-l" "f", or None where it raises."""
    try:
        return rouge.Rouge().get_scores(prediction, reference)[0]["rouge-l"]["f"]
    except ValueError:
        return None


rng = random.Random(0)
pairs = HAND_MADE + [(random_text(rng), random_text(rng)) for _ in range(300)]
corpus = [{"prediction": p, "reference": r, "f": package_f(p, r)} for p, r in pairs]
os.makedirs(OUT, exist_ok=True)
path = os.path.join(OUT, "rouge_l.json")
# One pair a line, so that a diff shows which pair changed
lines = [json.dumps(pair, ensure_ascii=False) for pair in corpus]
with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write('{"package": "rouge ' + rouge.__version__ + '", "pairs": [\n' + ",\n".join(lines) + "\n]}\n")
os.replace(path + ".tmp", path)
print(f"wrote {path}: {len(corpus)} pairs, {sum(c['f'] is None for c in corpus)} where the package raises")

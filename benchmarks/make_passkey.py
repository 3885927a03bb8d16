"""Passkey cases hidden in a book, in the format of data/passkey/dev-austen.jsonl: the same instruction, a
contiguous excerpt of the book as filler, "The pass key is N. Remember it. N is the pass key." at a sentence
boundary near the chosen depth, and the question at the end. The dev file has 9 cases up to 4k tokens, of which the
full cache finds 6: too few to tell two good policies apart. This makes a larger set from another book, made after
the policies were chosen on the dev set, so nothing was tuned on it.

Lengths are counted in tokens of the default model's tokenizer (the context, before the question). Deterministic:
the same book, seed, lengths and depths give the same file.

    python -m benchmarks.make_passkey [--book texts/prideprejudice.txt] [--seed 5] [--out PATH]
    python -m benchmarks.make_passkey --book texts/sensesensibility.txt --seed 7 8 --out data/passkey/dev-sense.jsonl
    python -m benchmarks.make_passkey --seed 13 14 --out data/passkey/heldout3-austen.jsonl

The second makes the 60-case dev set in Sense and Sensibility (one grid per seed, numbered on) on which
compactor's settings were chosen, in a book apart from the held-out cases'. The third makes the third held-out draw
(`passkey_after --cases heldout3`), 60 cases made after every setting was fixed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from benchmarks import common

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
         "you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
LENGTHS = (1000, 1600, 2200, 2800, 3400, 4000)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def sentences(text: str) -> list[str]:
    """The book's sentences, whitespace collapsed (a sentence ends at . ! or ? and a closing quote, if any)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?]\")) (?=[A-Z\"])", flat) if s]


def make_case(book: list[str], count_tokens, rng: random.Random, case_id: int, tokens: int,
              depth: float) -> dict:
    """One case: sentences from a random start while they hold at most `tokens` tokens; the key sentence adds
    its ~25 on top."""
    start = rng.randrange(len(book) // 2)
    excerpt: list[str] = []
    total = count_tokens(INTRO)
    for sentence in book[start:]:
        total += count_tokens(" " + sentence)
        if total > tokens:
            break
        excerpt.append(sentence)
    key = str(rng.randrange(10_000, 100_000))
    at = round(depth * len(excerpt))
    filler = excerpt[:at] + [f"The pass key is {key}. Remember it. {key} is the pass key."] + excerpt[at:]
    return {"id": case_id, "tokens": tokens, "depth": depth,
            "prompt": " ".join([INTRO, *filler, QUESTION]), "answer": key}


def make(book_text: str, count_tokens, seeds: int | list[int]) -> list[dict]:
    """One grid of lengths × depths per seed, the cases numbered on from one grid to the next."""
    book = sentences(book_text)
    grid = [(tokens, depth) for tokens in LENGTHS for depth in DEPTHS]
    cases = []
    for seed in [seeds] if isinstance(seeds, int) else seeds:
        rng = random.Random(seed)
        cases += [make_case(book, count_tokens, rng, len(cases) + i, tokens, depth)
                  for i, (tokens, depth) in enumerate(grid)]
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--book", default="texts/prideprejudice.txt", help="a text under data/ (or ../shared/data)")
    parser.add_argument("--seed", type=int, nargs="+", default=[5], help="one grid of 30 cases per seed")
    parser.add_argument("--out", type=Path, default=common.ROOT / "data" / "passkey" / "heldout-austen.jsonl")
    args = parser.parse_args(argv)
    from kvbound.loading import resolve_model
    from kvbound.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(resolve_model())
    cases = make(common.data_file(args.book).read_text(encoding="utf-8"), lambda s: len(tokenizer.encode(s)),
                 args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(case) + "\n" for case in cases))
    print(f"{len(cases)} cases -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A scripted long chat from a book, in the dev chat's format: eight facts told in the first ~25 turns, asked in the
last ~90, every other turn a question about a passage of the book. The dev chat (data/conversations) was written
from Pride and Prejudice; this makes a second one from another book, with other facts, so the recall suite is not
tuned to one script.

Line 1 is {"system": ...}; each later line {"user": ...}, the questions also {"expect": [answer]}. Deterministic:
the same book, seed and turn count give the same file.

    python -m benchmarks.make_chat [--book texts/sensesensibility.txt] [--turns 200] [--seed 7] [--out PATH]
    python -m benchmarks.make_chat --book texts/prideprejudice.txt --seed 11 --facts heldout \
        --out data/conversations/heldout-200-turns.jsonl   # the held-out chat
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from benchmarks import common

SYSTEM = "You are a helpful assistant. Keep answers short."
ASKS = ("Who speaks in this passage, and what do they want?", "Summarize this passage in two sentences:",
        "Explain this passage to a child:", "What is the mood of this passage?")
# (told, asked, answer): none of these words is in the dev chat, and none is a name in Austen's books.
FACTS = [
    ("My train ticket reference is QX5173. Please remember it.", "What is my train ticket reference?", "QX5173"),
    ("My neighbour's cat is called Juniper. Please remember it.", "What is my neighbour's cat called?", "Juniper"),
    ("The door code of the studio is 4619. Please remember it.", "What is the door code of the studio?", "4619"),
    ("My favourite fruit is quince. Please remember it.", "What is my favourite fruit?", "quince"),
    ("The shared drive password is Lantern7302. Please remember it.", "What is the shared drive password?",
     "Lantern7302"),
    ("I keep my bicycle in rack 8847 at the station. Please remember it.",
     "In which rack at the station do I keep my bicycle?", "8847"),
    ("My grandmother lives in the village of Kettlewell. Please remember it.",
     "In which village does my grandmother live?", "Kettlewell"),
    ("The printer on our floor is named Osprey. Please remember it.", "What is the printer on our floor named?",
     "Osprey"),
]
# A third set for a chat nothing was tuned on (the recall note's format was chosen on the dev chat and the sense
# chat): other kinds of facts, none of them in either chat nor a name in Austen's books.
HELDOUT_FACTS = [
    ("My locker at the gym is number 2318. Please remember it.", "What is my locker number at the gym?", "2318"),
    ("The wifi network at the cabin is called Heron42. Please remember it.",
     "What is the wifi network at the cabin called?", "Heron42"),
    ("My sister's dog is named Biscuit. Please remember it.", "What is my sister's dog named?", "Biscuit"),
    ("The parcel tracking number is ZR88041. Please remember it.", "What is the parcel tracking number?", "ZR88041"),
    ("Our project codename is Bramble. Please remember it.", "What is our project codename?", "Bramble"),
    ("The combination of my bike lock is 6502. Please remember it.", "What is the combination of my bike lock?",
     "6502"),
    ("My favourite tea is rooibos. Please remember it.", "What is my favourite tea?", "rooibos"),
    ("The meeting room on the third floor is called Tamarind. Please remember it.",
     "What is the meeting room on the third floor called?", "Tamarind"),
]
FACT_SETS = {"sense": FACTS, "heldout": HELDOUT_FACTS}
TELL_FROM, TELL_EVERY = 2, 3  # fact i is told at turn 2 + 3i (turns 2-23)
ASK_EVERY = 12  # asked every 12 turns up to the last turn, in the order they were told, reversed


def passages(text: str, low: int = 400, high: int = 1100) -> list[str]:
    """Paragraphs of the book between `low` and `high` characters, joined into one line each."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if low <= len(p) <= high and not p.isupper() and "CHAPTER" not in p]


def make(book: Path, turns: int, seed: int, facts: list[tuple[str, str, str]] = FACTS) -> list[dict]:
    if turns < TELL_FROM + TELL_EVERY * len(facts) + ASK_EVERY * len(facts):
        raise ValueError(f"{turns} turns leave no room between the facts and their questions")
    rng = random.Random(seed)
    pool = passages(book.read_text(encoding="utf-8"))
    rng.shuffle(pool)
    script: dict[int, dict] = {}
    for i, (told, _, _) in enumerate(facts):
        script[TELL_FROM + TELL_EVERY * i] = {"user": told}
    for i, (_, asked, answer) in enumerate(reversed(facts)):
        script[turns - ASK_EVERY * i] = {"user": asked, "expect": [answer]}
    lines, used = [{"system": SYSTEM}], 0
    for turn in range(1, turns + 1):
        if turn not in script:
            script[turn] = {"user": f"{rng.choice(ASKS)}\n\n{pool[used % len(pool)]}"}
            used += 1
        lines.append(script[turn])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.make_chat", description=__doc__.splitlines()[0])
    parser.add_argument("--book", default="texts/sensesensibility.txt", help="a text under data/ (or a path)")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--facts", choices=sorted(FACT_SETS), default="sense",
                        help="which eight facts (heldout: a set no setting was chosen on)")
    parser.add_argument("--out", type=Path, default=common.ROOT / "data" / "conversations" / "sense-200-turns.jsonl")
    args = parser.parse_args(argv)
    book = Path(args.book) if Path(args.book).is_file() else common.data_file(args.book)
    lines = make(book, args.turns, args.seed, FACT_SETS[args.facts])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    common.log(f"wrote {args.out}: {args.turns} turns, {len(FACT_SETS[args.facts])} facts")
    return 0


if __name__ == "__main__":
    sys.exit(main())

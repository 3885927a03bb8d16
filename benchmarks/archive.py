"""The recall archive at scale: a session that evicts 100,000 turns. Each turn's text (60-300 words of Pride and
Prejudice, a fact every 500 turns) goes into one Archive under its default byte cap; measured: the time to archive
a turn and to search before a turn, as the archive fills and after it has been at its cap for a long time, and
the SQLite pages it holds against the cap. No model: this is the archive's own cost per turn.

    python -m benchmarks.archive [--quick] [--turns 100000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

from benchmarks import common

SUITE = "archive"


def measure(turns: int) -> dict[str, Any]:
    from kvbound.chat.archive import DEFAULT_CAP_BYTES, Archive

    words = common.data_file("texts/prideprejudice.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)
    archive = Archive()
    checkpoints, adds, searches = {}, [], []
    marks = {1_000, 10_000, turns} | {turns // 2}
    for turn in range(1, turns + 1):
        start = rng.randrange(len(words) - 300)
        text = " ".join(words[start:start + rng.randint(60, 300)])
        if turn % 500 == 0:
            text += f" My locker number is L{turn}."
        t0 = time.perf_counter()
        archive.add(turn, f"User: {text}\nAssistant: noted.")
        adds.append(time.perf_counter() - t0)
        if turn % 97 == 0:  # a search before some turns: a question about a recent fact, and a long message
            question = f"What was locker number L{(turn // 500) * 500 or 500}?"
            t0 = time.perf_counter()
            archive.search(question)
            archive.search(" ".join(words[start:start + 200]))
            searches.append((time.perf_counter() - t0) / 2)
        if turn in marks:
            pages = archive._db.execute("PRAGMA page_count").fetchone()[0] * \
                archive._db.execute("PRAGMA page_size").fetchone()[0]
            checkpoints[turn] = {"entries": len(archive), "text_bytes": archive.nbytes, "sqlite_bytes": pages,
                                 "add_ms_p50": round(statistics.median(adds) * 1e3, 3),
                                 "add_ms_max": round(max(adds) * 1e3, 3),
                                 "search_ms_p50": round(statistics.median(searches) * 1e3, 3),
                                 "search_ms_max": round(max(searches) * 1e3, 3)}
            common.log(f"archive: {turn:,} turns {checkpoints[turn]}")
            adds, searches = [], []
    return {"turns": turns, "cap_bytes": DEFAULT_CAP_BYTES, "checkpoints": checkpoints}


def markdown(result: dict[str, Any]) -> str:
    rows = [[f"{int(turn):,}", f"{c['entries']:,}", f"{c['text_bytes'] / 2**20:.2f} MiB",
             f"{c['sqlite_bytes'] / 2**20:.2f} MiB", f"{c['add_ms_p50']:.3f} / {c['add_ms_max']:.2f}",
             f"{c['search_ms_p50']:.2f} / {c['search_ms_max']:.2f}"]
            for turn, c in sorted(result["checkpoints"].items(), key=lambda kv: int(kv[0]))]
    table = common.markdown_table(["turns archived", "entries kept", "text", "SQLite pages",
                                   "archive a turn, ms (median / max)", "search, ms (median / max)"], rows)
    return (f"One session's archive under its default cap of {result['cap_bytes'] / 2**20:.0f} MiB of text; the "
            "times are for the turns since the previous row.\n\n" + table)


def headlines(result: dict[str, Any]) -> list[str]:
    last = result["checkpoints"][max(result["checkpoints"], key=int)]
    return [f"Recall archive after {result['turns']:,} evicted turns: {last['text_bytes'] / 2**20:.2f} MiB of text "
            f"({last['sqlite_bytes'] / 2**20:.2f} MiB of SQLite pages) under its "
            f"{result['cap_bytes'] / 2**20:.0f} MiB cap; archiving a turn {last['add_ms_p50']:.2f} ms, a search "
            f"{last['search_ms_p50']:.2f} ms (medians)."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 turns")
    parser.add_argument("--turns", type=int, default=100_000)
    args = parser.parse_args(argv)
    result = measure(10_000 if args.quick else args.turns)
    return common.finish(SUITE, result, args.quick, markdown)


if __name__ == "__main__":
    sys.exit(main())

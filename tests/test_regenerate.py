"""Self-distillation: batched greedy replies equal HF greedy per prompt; EOS; cache reuse; resume."""

from __future__ import annotations

import pytest
import torch

from dovetail_train.data import regenerate as R
from dovetail_train.data.conversations import Conversation
from dovetail_train.data.regenerate import prompt_ids, read_part, regenerate

CONVS = [
    Conversation("a", [{"role": "user", "content": "Hi"}]),
    Conversation("b", [{"role": "user", "content": "Write a long poem about the sea and the ships on it."}]),
    Conversation(
        "c",
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And times three?"},
            {"role": "assistant", "content": "an old reply that the target replaces"},
        ],
    ),
    Conversation("d", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]),
]
NEW = 10


class WithEos:
    """The tiny target with chosen EOS ids (a random model rarely emits its real EOS)."""

    def __init__(self, target, eos: list[int]) -> None:
        self._t, self._eos = target, eos

    def __getattr__(self, name):
        return getattr(self._t, name)

    @property
    def eos_ids(self) -> list[int]:
        return self._eos


def hf_reference(target, prompts: list[list[int]], eos: list[int]) -> list[list[int]]:
    """HF greedy generate one prompt at a time (no padding), cut after the first EOS."""
    hf, out = target.hf_model(), []
    for p in prompts:
        ids = torch.tensor([p])
        gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                          eos_token_id=eos, pad_token_id=eos[0])  # fmt: skip
        out.append(R._strip(gen[0, len(p) :].tolist(), eos))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def decodes(monkeypatch):
    """Counts decoded rows per engine call; can crash on a given call."""
    state = {"rows": 0, "calls": 0, "crash_on": None}
    real = R.greedy_static

    def counted(target, prompts, max_new_tokens):
        state["calls"] += 1
        if state["crash_on"] == state["calls"]:
            raise RuntimeError("simulated crash")
        state["rows"] += len(prompts)
        return real(target, prompts, max_new_tokens)

    monkeypatch.setattr(R, "greedy_static", counted)
    return state


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_batched_equals_hf_per_prompt(tiny_target, engine):
    prompts = prompt_ids(tiny_target, CONVS)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    decode = R.greedy_static if engine == "static" else R.greedy_hf
    assert decode(tiny_target, prompts, NEW) == hf_reference(tiny_target, prompts, tiny_target.eos_ids)


def test_eos_stops_each_row(tiny_target, tmp_path):
    prompts = prompt_ids(tiny_target, CONVS)
    free = R.greedy_static(tiny_target, prompts, NEW)
    stop = free[1][3]  # row 1 stops at its 4th token; others stop wherever that token appears, if at all
    target = WithEos(tiny_target, [stop])
    got = R.greedy_static(target, prompts, NEW)
    assert got == hf_reference(tiny_target, prompts, [stop])
    assert got[1] == free[1][:4]
    for row in got:
        assert stop not in row[:-1] and (row[-1] == stop or len(row) == NEW)
    out = regenerate(target, CONVS, tmp_path, max_new_tokens=NEW, batch_size=4, progress=False)
    recs = read_part(next(tmp_path.glob("regen-*")) / "part.jsonl")
    assert recs[1]["eos"] and all(r["eos"] == (r["ids"][-1] == stop) for r in recs.values())
    assert out[1].messages[-1]["content"] == tiny_target.tokenizer.decode(free[1][:3], skip_special_tokens=True).strip()


def test_multi_turn_keeps_context(tiny_target, tmp_path, decodes):
    out = regenerate(tiny_target, CONVS, tmp_path, max_new_tokens=NEW, batch_size=2, progress=False)
    assert [c.id for c in out] == [c.id for c in CONVS]
    assert out[2].messages[:3] == CONVS[2].messages[:3] and len(out[2].messages) == 4
    assert out[2].messages[3]["role"] == "assistant" and "old reply" not in out[2].messages[3]["content"]
    assert out[3].messages[0]["role"] == "system" and all(len(c.messages[-1]["content"]) > 0 for c in out)


def test_cache_reuse_and_key(tiny_target, tmp_path, decodes):
    first = regenerate(tiny_target, CONVS, tmp_path, max_new_tokens=NEW, batch_size=2, progress=False)
    assert decodes["rows"] == 4
    again = regenerate(tiny_target, CONVS, tmp_path, max_new_tokens=NEW, batch_size=3, progress=False)
    assert decodes["rows"] == 4 and again == first  # reused: nothing decoded
    regenerate(tiny_target, CONVS, tmp_path, max_new_tokens=NEW - 1, batch_size=4, progress=False)
    regenerate(tiny_target, CONVS[:3], tmp_path, max_new_tokens=NEW, batch_size=4, progress=False)
    assert decodes["rows"] == 4 + 4 + 3 and len(list(tmp_path.glob("regen-*"))) == 3


def test_resume_after_crash_and_torn_line(tiny_target, tmp_path, decodes):
    decodes["crash_on"] = 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        regenerate(tiny_target, CONVS, tmp_path, max_new_tokens=NEW, batch_size=2, progress=False)
    part = next(tmp_path.glob("regen-*")) / "part.jsonl"
    assert len(read_part(part)) == 2
    with open(part, "ab") as f:  # a half-written line from a process killed mid-write
        f.write(b'{"i": 3, "ids": [1, 2')
    decodes.update(rows=0, crash_on=None)
    resumed = regenerate(tiny_target, CONVS, tmp_path, max_new_tokens=NEW, batch_size=2, progress=False)
    assert decodes["rows"] == 2  # only the unfinished batch
    assert part.read_bytes().endswith(b"\n") and len(part.read_bytes().splitlines()) == 4
    fresh = regenerate(tiny_target, CONVS, tmp_path / "fresh", max_new_tokens=NEW, batch_size=4, progress=False)
    assert resumed == fresh


def test_corrupt_middle_line_is_dropped(tmp_path):
    part = tmp_path / "part.jsonl"
    part.write_bytes(b'{"i": 0, "ids": [5], "eos": false}\n{"i": 1, "ids": [5\n{"i": 2, "ids": [7], "eos": true}\n')
    assert list(read_part(part)) == [0]
    assert part.read_bytes() == b'{"i": 0, "ids": [5], "eos": false}\n'

"""Text in, text out: Dovetail.chat / Dovetail.stream on the tiny random target (SmolLM2's tokenizer)."""

from __future__ import annotations

import pytest
import torch
from helpers.engine import random_draft

from dovetail_infer import Dovetail, InferConfig
from dovetail_infer.text import TextStream, _held_back

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def engine(tiny_target) -> Dovetail:
    return Dovetail(tiny_target, random_draft(tiny_target, depth=1), "cpu")


def _text(target, ids: list[int]) -> str:
    ids = [t for t in ids if t not in set(target.eos_ids)]
    return target.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_greedy_chat_equals_stream_equals_target_only_text(engine, tiny_target):
    infer = InferConfig(budget=6, depth=4, top_k=2)
    res = engine.chat(MESSAGES, max_tokens=40, infer=infer)
    stream = engine.stream(MESSAGES, max_tokens=40, infer=infer)
    deltas = list(stream)
    ids = tiny_target.apply_chat_template(MESSAGES)
    base = engine.generate_baseline(ids, InferConfig(max_new_tokens=40))
    assert "".join(deltas) == res.text == stream.result.text == _text(tiny_target, base.output_ids)
    assert res.prompt_tokens == len(ids) and res.completion_tokens == len(base.output_ids)
    assert res.finish_reason == ("stop" if set(base.output_ids) & set(tiny_target.eos_ids) else "length")
    assert res.forwards >= 1 and res.tau >= 1.0 and res.tokens_per_s > 0


def test_stop_string_ends_the_reply_and_is_left_out(engine, tiny_target):
    full = engine.chat(MESSAGES, max_tokens=40).text
    # a stop string from the middle of the reply: the first plain 3-letter window after its first 5 characters
    stop = next(
        full[i : i + 3] for i in range(5, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].isalpha()
    )
    cut = full.index(stop)
    res = engine.chat(MESSAGES, max_tokens=40, stop=["never-there", stop])
    assert res.text == full[:cut] and res.finish_reason == "stop"
    assert "".join(engine.stream(MESSAGES, max_tokens=40, stop=stop)) == full[:cut]


class _Fake:
    """An engine whose decoding yields given tokens, one per step."""

    def __init__(self, target, tokens: list[int]) -> None:
        self.target, self.tokens = target, tokens

    def check_prompt(self, ids, cfg) -> None:
        pass

    def decode_steps(self, ids, cfg):
        for t in self.tokens:
            yield [t]


@pytest.mark.parametrize("text", ["héllo wörld 世界 🙂 done", "Ünïcödé 🧪🧪 ok"])
def test_multibyte_characters_split_across_tokens_are_never_cut(tiny_target, text):
    tokens = tiny_target.tokenizer.encode(text, add_special_tokens=False)
    pieces = [tiny_target.tokenizer.decode([t]) for t in tokens]
    assert any("\ufffd" in p for p in pieces)  # the test needs a character split across tokens
    stream = TextStream(_Fake(tiny_target, tokens), MESSAGES, InferConfig())
    deltas = list(stream)
    assert "".join(deltas) == text == stream.result.text
    assert not any("\ufffd" in d for d in deltas)


def test_a_stop_string_split_across_tokens_is_held_back(tiny_target):
    text = "alpha beta <|end|> gamma"
    tokens = tiny_target.tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(_Fake(tiny_target, tokens), MESSAGES, InferConfig(), stop="<|end|>")
    deltas = list(stream)
    assert "".join(deltas) == "alpha beta " and stream.result.finish_reason == "stop"
    assert _held_back("abc <|en", ["<|end|>"]) == 4 and _held_back("abc\ufffd", []) == 1


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": "  "}], "all empty"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
    ],
)
def test_bad_messages_name_the_field(engine, messages, match):
    with pytest.raises(ValueError, match=match):
        engine.chat(messages)


def test_bad_arguments_fail_before_decoding(engine):
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.stream(MESSAGES, max_tokens=0)
    with pytest.raises(ValueError, match="stop must be"):
        engine.stream(MESSAGES, stop=["ok", ""])
    with pytest.raises(ValueError, match="exceed the context"):
        engine.stream([{"role": "user", "content": "word " * 5000}])


def test_sampled_chat_is_seeded(engine):
    a = engine.chat(MESSAGES, max_tokens=24, temperature=0.8, seed=3).text
    b = engine.chat(MESSAGES, max_tokens=24, temperature=0.8, seed=3).text
    assert a == b
    torch.manual_seed(0)  # the engine's generators are seeded by `seed`, not by torch's global state
    assert engine.chat(MESSAGES, max_tokens=24, temperature=0.8, seed=3).text == a


# ---- chat.py ---------------------------------------------------------------------------------------------------
def _chat(draft_dir, tmp_path, *args: str, stdin: str | None = None):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "chat.py", "target=tiny_random", f"ckpt={draft_dir}", "max_tokens=12",
           "infer.budget=4", "infer.depth=3", "infer.top_k=2", f"hydra.run.dir={tmp_path}", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, input=stdin or "", capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_draft_dir(tiny_target, tmp_path_factory):
    from dovetail_infer.checkpoint import save_draft

    return save_draft(random_draft(tiny_target, depth=1).float(), tmp_path_factory.mktemp("d") / "draft",
                      tiny_target.identity())  # fmt: skip


@pytest.mark.slow
def test_chat_cli_answers_a_prompt_and_piped_turns(engine, tiny_draft_dir, tmp_path):
    one = _chat(tiny_draft_dir, tmp_path, "prompt=Write a haiku about the sea.")
    assert one.returncode == 0, one.stderr[-2000:]
    want = engine.chat(MESSAGES, max_tokens=12, infer=InferConfig(budget=4, depth=3, top_k=2)).text
    assert one.stdout == want + "\n"  # the same greedy reply as the Python API (the draft does not change it)
    assert "τ" in one.stderr and "tok/s" in one.stderr
    piped = _chat(
        tiny_draft_dir, tmp_path, stdin="Write a haiku about the sea.\n/reset\nWrite a haiku about the sea.\n"
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout == 2 * (want + "\n")  # /reset: the second turn starts a fresh conversation

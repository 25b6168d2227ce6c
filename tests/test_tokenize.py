"""Chat-template tokenization: the loss mask covers exactly the assistant tokens (content + end-of-turn)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import target_spec

from dovetail_infer.models.target import Target
from dovetail_train.data.conversations import load_conversations
from dovetail_train.data.tokenize import (
    masked_segments,
    tokenize_conversation,
    tokenize_conversations,
    tokenize_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "data"
LLAMA2 = target_spec("llama2_chat_7b")["chat_template"]

SYSTEM = {"role": "system", "content": "You answer briefly."}
CHAT = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And in Python?"},
    {"role": "assistant", "content": "```python\nprint(2 + 2)  # 4\n```\nIt prints **4** — done. 😀"},
    {"role": "user", "content": "Say yes"},
    {"role": "assistant", "content": "  Say yes  "},  # repeats the user's text, with edge spaces
]


def _check_roundtrip(tok, messages, out):
    ids, mask = out["input_ids"], out["loss_mask"]
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    replies = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    segments = masked_segments(ids, mask)
    assert [tok.decode(s, skip_special_tokens=True).strip() for s in segments] == replies
    return segments


@pytest.mark.parametrize("template", [None, LLAMA2], ids=["smollm2", "llama2"])
@pytest.mark.parametrize("system", [False, True], ids=["nosys", "sys"])
def test_mask_roundtrip_multiturn(tiny_target, template, system):
    tok = tiny_target.tokenizer
    messages = [SYSTEM, *CHAT] if system else CHAT
    out = tokenize_conversation(tiny_target, messages, 4096, chat_template=template)
    segments = _check_roundtrip(tok, messages, out)
    # every assistant turn ends with its end-of-turn token (SmolLM2 <|im_end|>; the LLaMA-2 template's eos_token)
    assert all(s[-1] == tok.eos_token_id for s in segments)
    # the ids are exactly the template's own tokenization
    stub = SimpleNamespace(tokenizer=tok, chat_template=template or tok.chat_template, spec=tiny_target.spec)
    assert out["input_ids"] == Target.apply_chat_template(stub, messages, add_generation_prompt=False)
    # nothing outside the assistant turns is masked: unmasked text holds every user turn and no reply
    unmasked = tok.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if not m])
    assert all(m["content"] in unmasked for m in messages if m["role"] != "assistant")
    assert "2 + 2 = 4" not in unmasked and "print(2" not in unmasked


def test_tokenizer_and_target_agree(tiny_target):
    a = tokenize_conversation(tiny_target, CHAT[:2], 256)
    b = tokenize_conversation(tiny_target.tokenizer, CHAT[:2], 256)
    assert a == b
    assert tokenize_conversations(tiny_target, [CHAT[:2], CHAT], 256)["input_ids"][0] == a["input_ids"]


def test_target_system_prompt_is_used(tiny_target):
    tok = tiny_target.tokenizer
    spec = SimpleNamespace(system_prompt="Always be kind.")
    stub = SimpleNamespace(tokenizer=tok, chat_template=LLAMA2, spec=spec, eos_ids=tiny_target.eos_ids)
    out = tokenize_conversation(stub, CHAT[:2], 512)
    assert "Always be kind." in tok.decode(out["input_ids"])
    _check_roundtrip(tok, CHAT[:2], out)
    assert tokenize_prompt(stub, CHAT[:3]) == Target.apply_chat_template(stub, CHAT[:3])


def test_truncation_keeps_the_beginning(tiny_target):
    full = tokenize_conversation(tiny_target, CHAT, 4096)
    for n in (5, 40, len(full["input_ids"]) - 1):
        cut = tokenize_conversation(tiny_target, CHAT, n)
        assert cut["input_ids"] == full["input_ids"][:n] and cut["loss_mask"] == full["loss_mask"][:n]
    assert sum(tokenize_conversation(tiny_target, CHAT, 5)["loss_mask"]) == 0


@pytest.mark.parametrize("template", [None, LLAMA2], ids=["smollm2", "llama2"])
def test_prompt_ids_equal_apply_chat_template(tiny_target, template):
    tok = tiny_target.tokenizer
    stub = SimpleNamespace(tokenizer=tok, chat_template=template or tok.chat_template, spec=tiny_target.spec)
    for end in (1, 3, 4, 6):  # ending on a user turn or on a reply: the prompt stops at the last user turn
        last_user = max(i for i, m in enumerate(CHAT[:end]) if m["role"] == "user")
        expected = Target.apply_chat_template(stub, CHAT[: last_user + 1])
        assert tokenize_prompt(tiny_target, CHAT[:end], chat_template=template) == expected
    assert tokenize_prompt(tiny_target, CHAT[:1]) == tiny_target.apply_chat_template(CHAT[:1])
    with pytest.raises(ValueError, match="user"):
        tokenize_prompt(tiny_target, [SYSTEM])


def test_prompt_only_rows_have_no_loss(tiny_target):
    convs, _ = load_conversations(ROOT / "data" / "prompts" / "dovetail_prompts.jsonl", limit=40)
    out = tokenize_conversations(tiny_target, convs, 512)
    assert len(out["input_ids"]) == 40
    assert all(len(i) == len(m) and 0 < len(i) <= 512 for i, m in zip(out["input_ids"], out["loss_mask"]))
    assert all(bool(sum(mask)) == conv.has_reply for conv, mask in zip(convs, out["loss_mask"]))


def test_template_that_alters_replies_is_an_error(tiny_target):
    upper = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="chat template"):
        tokenize_conversation(tiny_target, CHAT[2:4], 128, chat_template=upper)


@pytest.mark.skipif(not (SHARED / "sharegpt").is_dir(), reason="data/sharegpt not present")
def test_real_replies_roundtrip_and_speed(tiny_target):
    convs, _ = load_conversations(SHARED / "sharegpt" / "sharegpt_smollm2_replies.jsonl")
    start = time.perf_counter()
    out = tokenize_conversations(tiny_target, convs, 2048)
    elapsed = time.perf_counter() - start
    assert len(convs) > 3000 and elapsed < 45, f"{len(convs)} conversations took {elapsed:.1f}s"
    tok = tiny_target.tokenizer
    for conv, ids, mask in list(zip(convs, out["input_ids"], out["loss_mask"]))[::7]:
        if len(ids) < 2048:
            _check_roundtrip(tok, conv.messages, {"input_ids": ids, "loss_mask": mask})

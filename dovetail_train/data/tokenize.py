"""Chat template -> `input_ids` + `loss_mask`, with the loss on exactly the assistant tokens.

The chat is rendered to text with the target's template (and its default system prompt, as
`Target.apply_chat_template` does), each assistant message is located in that text by character offsets,
and the text is tokenized once with offsets (`add_special_tokens=False`: the template places BOS/EOS itself).
A token is in the loss when its characters overlap an assistant span. An assistant span is the message
content as rendered (templates may trim it) plus the end-of-turn token that follows it (the tokenizer's EOS or
one of the target's EOS ids, e.g. `<|im_end|>` for SmolLM2, `</s>` for LLaMA-2), with the whitespace in
between; the newline a template writes after the end-of-turn token is not predicted and not in the loss.
So decoding the masked tokens with `skip_special_tokens=True` gives back the assistant text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dovetail_train.data.conversations import Conversation

Messages = list[dict[str, str]]


@dataclass
class ChatFormat:
    """What tokenization needs from a target: tokenizer, template, default system prompt, end-of-turn texts."""

    tokenizer: Any
    chat_template: str | None
    system_prompt: str | None
    eos_texts: tuple[str, ...]

    @classmethod
    def of(cls, target_or_tokenizer: Any, chat_template: str | None = None, system_prompt: str | None = None):
        """From a `Target` (its template and system prompt) or a HF tokenizer (its own template)."""
        if isinstance(target_or_tokenizer, ChatFormat):
            return target_or_tokenizer
        tok = getattr(target_or_tokenizer, "tokenizer", None)
        if tok is not None and hasattr(target_or_tokenizer, "spec"):
            template = chat_template or target_or_tokenizer.chat_template
            system = system_prompt if system_prompt is not None else target_or_tokenizer.spec.system_prompt
            eos_ids = list(target_or_tokenizer.eos_ids)
        else:
            tok = target_or_tokenizer
            template = chat_template or getattr(tok, "chat_template", None)
            system = system_prompt
            eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if not template:
            raise ValueError("the tokenizer has no chat template; set target.chat_template in conf/target/<name>.yaml")
        texts = {tok.eos_token} if tok.eos_token else set()
        texts.update(t for t in tok.convert_ids_to_tokens(eos_ids) if t)
        return cls(tok, template, system, tuple(sorted(texts, key=len, reverse=True)))

    def with_system(self, messages: Messages) -> Messages:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def _messages(conv: Conversation | Messages) -> Messages:
    return conv.messages if isinstance(conv, Conversation) else list(conv)


def assistant_spans(fmt: ChatFormat, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the `[start, end)` character span of each assistant message (+ its end-of-turn)."""
    messages = fmt.with_system(messages)
    text = fmt.render(messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # Search inside the text this message added (templates are prefix-consistent); else after the cursor.
        lo, hi = cursor, len(text)
        try:
            before, upto = fmt.render(messages[:i]), fmt.render(messages[: i + 1])
            if text.startswith(upto) and upto.startswith(before):
                lo, hi = max(lo, len(before)), len(upto)
        except Exception:  # some templates reject partial chats; the cursor search still works
            pass
        # The content verbatim, else as trimmed; in this message's own text first, else anywhere after the cursor.
        tries = [(c, a, b) for a, b in ((lo, hi), (cursor, len(text))) for c in (m["content"], m["content"].strip())]
        start, content = -1, m["content"]
        for content, a, b in tries:
            if (start := text.find(content, a, b)) >= 0:
                break
        if start < 0:
            raise ValueError(
                f"assistant message {i} ({content[:40]!r}...) is not in the rendered chat: the chat template "
                "changes assistant text; set target.chat_template to one that writes it verbatim"
            )
        end = start + len(content)
        rest = text[end:]
        gap = len(rest) - len(rest.lstrip())
        eos = next((e for e in fmt.eos_texts if rest[gap:].startswith(e)), None)
        if eos is not None:
            end += gap + len(eos)
        spans.append((start, end))
        cursor = end
    return text, spans


def _mask(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    mask, j = [], 0
    for s, e in offsets:
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        mask.append(int(j < len(spans) and s < spans[j][1] and e > spans[j][0] and e > s))
    return mask


def tokenize_conversations(
    target_or_tokenizer: Any,
    conversations: Sequence[Conversation | Messages],
    max_length: int,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, list[list[int]]]:
    """Batch `tokenize_conversation`: `{"input_ids": [...], "loss_mask": [...]}`, one entry per conversation."""
    fmt = ChatFormat.of(target_or_tokenizer, chat_template, system_prompt)
    rendered = [assistant_spans(fmt, _messages(c)) for c in conversations]
    if not rendered:
        return {"input_ids": [], "loss_mask": []}
    enc = fmt.tokenizer(
        [t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False
    )
    ids_out, mask_out = [], []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids_out.append(list(ids[:max_length]))
        mask_out.append(_mask(offsets[:max_length], spans))
    return {"input_ids": ids_out, "loss_mask": mask_out}


def tokenize_conversation(
    target_or_tokenizer: Any,
    messages: Conversation | Messages,
    max_length: int,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, list[int]]:
    """`{"input_ids", "loss_mask"}` for one chat, truncated to `max_length` tokens (the beginning is kept).

    `target_or_tokenizer` is a `Target` (its chat template and system prompt) or a HF tokenizer; `chat_template`
    and `system_prompt` override them. `loss_mask[i]` is 1 for assistant tokens (content + end-of-turn).
    """
    out = tokenize_conversations(target_or_tokenizer, [messages], max_length, chat_template, system_prompt)
    return {"input_ids": out["input_ids"][0], "loss_mask": out["loss_mask"][0]}


def tokenize_prompt(
    target_or_tokenizer: Any,
    messages: Conversation | Messages,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> list[int]:
    """Prompt ids for generation: the messages up to the last user turn + the generation prompt.

    Equals `Target.apply_chat_template(messages[:last_user + 1])`; callers filter prompts that are too long.
    """
    fmt = ChatFormat.of(target_or_tokenizer, chat_template, system_prompt)
    msgs = _messages(messages)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        raise ValueError("a prompt needs a user message; got roles " + str([m["role"] for m in msgs]))
    text = fmt.render(fmt.with_system(msgs[: users[-1] + 1]), add_generation_prompt=True)
    return list(fmt.tokenizer(text, add_special_tokens=False)["input_ids"])


def masked_segments(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[list[int]]:
    """The runs of consecutive masked ids (one per assistant turn unless truncated); for checks and tests."""
    runs: list[list[int]] = []
    prev = 0
    for tok, m in zip(input_ids, loss_mask):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(tok)
        prev = m
    return runs

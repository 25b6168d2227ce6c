"""Text in, text out: chat messages → the target's chat template → speculative decoding → text deltas.

`Dovetail.stream(messages, ...)` yields the reply as text deltas while it is decoded; `Dovetail.chat(...)` returns
it whole. Deltas are cut so that, joined, they are exactly the final text: a multi-byte character split across tokens
is held back until complete, and so is any tail that could still turn into a stop string.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_tokens reached
    prompt_tokens: int
    completion_tokens: int  # tokens decoded (EOS and the tokens of a cut stop string included)
    forwards: int  # target forwards after prefill
    tau: float  # tokens per target forward
    tokens_per_s: float
    seconds: float


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as a list of {"role", "content"} dicts; errors name the message and the field."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise ValueError("the last message must be from the user (or system): the reply is what gets generated")
    if not any(m["content"].strip() for m in out):
        raise ValueError("messages are all empty: give the model something to answer")
    return out


def check_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep back: an incomplete character (decoded as U+FFFD until its last byte
    arrives) and, before it, the longest tail that begins a stop string."""
    core = text.rstrip("\ufffd")
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(core)), keep, -1):
            if core.endswith(s[:n]):
                keep = n
                break
    return len(text) - len(core) + keep


class TextStream:
    """Iterator of text deltas of one reply; `.result` (a ChatResult) is set once it is exhausted.

    Stops at EOS, at `max_new_tokens`, or at the first stop string (left out of the text; decoding stops there).
    `prompt_ids` replaces the chat template (raw completion of a prompt; `messages` is then ignored); `on_step` sees
    each decoding step's new tokens before they become text, and may raise to end decoding there (the server's
    cancellation and time limit).
    """

    def __init__(
        self,
        engine: Any,
        messages: Any,
        cfg: Any,
        stop: str | Sequence[str] | None = None,
        prompt_ids: list[int] | None = None,
        on_step: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.target = engine.target
        if prompt_ids is not None:
            self.prompt_ids = list(prompt_ids)
        else:
            self.prompt_ids = self.target.apply_chat_template(check_messages(messages))
        self.on_step = on_step
        self.stops = check_stop(stop)
        engine.check_prompt(self.prompt_ids, cfg)  # too long for the context: a ValueError now, not mid-stream
        self._steps = engine.decode_steps(self.prompt_ids, cfg)
        self.cfg = cfg
        self.result: ChatResult | None = None
        self._gen = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._gen

    def __next__(self) -> str:
        return next(self._gen)

    def _decode(self, ids: list[int]) -> str:
        return self.target.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _run(self) -> Iterator[str]:
        t0 = time.perf_counter()
        eos = set(self.target.eos_ids)
        ids: list[int] = []
        text, sent, steps, finish = "", 0, 0, "length"
        try:
            for new in self._steps:
                if self.on_step is not None:
                    self.on_step(new)
                steps += 1
                ids += new
                text = self._decode([t for t in ids if t not in eos])
                cut = min((i for i in (text.find(s, sent) for s in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    finish, text = "stop", text[:cut]
                    if cut > sent:
                        yield text[sent:cut]
                    sent = cut
                    break
                end = len(text) - _held_back(text, self.stops)
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if eos.intersection(new):
                    finish = "stop"
            else:  # `text` is the decode of every token: release what was held back for a stop string
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
        finally:
            self._steps.close()
        seconds = time.perf_counter() - t0
        forwards = max(steps - 1, 0)  # the first step is the prefill's token
        self.result = ChatResult(
            text=text[:sent],
            finish_reason=finish,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(ids),
            forwards=forwards,
            tau=(len(ids) - 1) / forwards if forwards else 0.0,
            tokens_per_s=len(ids) / seconds if seconds > 0 else 0.0,
            seconds=seconds,
        )


def infer_config(base: Any, max_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None):
    """`base` (an InferConfig) with the OpenAI-style sampling arguments that are given."""
    changes = {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})

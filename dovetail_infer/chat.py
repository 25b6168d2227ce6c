"""What chat.py does: load the target and the draft, then answer user turns, streaming each reply."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.evaluate import INFER_DEFAULTS, load_eval_target, resolve_device, to_infer_config
from dovetail_infer.text import ChatResult


def reply_config(cfg: dict[str, Any]) -> InferConfig:
    """The InferConfig a chat/serve config decodes a reply with when nothing else is asked: its `infer` group (keys
    it leaves out take INFER_DEFAULTS, InferConfig's own), the top-level `seed`, and `max_tokens` (null: the group's
    `max_new_tokens`). With `infer: default` and nothing overridden this is what `Dovetail.chat(messages)` uses."""
    infer = {**INFER_DEFAULTS, **(cfg.get("infer") or {})}
    length = {} if cfg.get("max_tokens") is None else {"max_new_tokens": int(cfg["max_tokens"])}
    return to_infer_config(infer, seed=int(cfg.get("seed") or 0), **length)


def build_engine(cfg: dict[str, Any]) -> tuple[Dovetail, InferConfig]:
    """The engine and the reply_config of a chat/serve config (`ckpt: null` = the target alone)."""
    icfg = reply_config(cfg)  # bad values fail before loading
    infer = {**INFER_DEFAULTS, **(cfg.get("infer") or {})}
    target = load_eval_target(cfg)
    if cfg.get("ckpt"):
        engine = Dovetail.from_pretrained(
            str(cfg["ckpt"]),
            target,
            draft_device=resolve_device(infer["draft_device"]),
            draft_vocab=infer["draft_vocab"],
            compile=infer["compile"] or False,
            draft_quant=infer["draft_quant"],
        )
    else:
        engine = Dovetail(target, None)
    return engine, icfg


def status_line(r: ChatResult) -> str:
    return (
        f"[{r.completion_tokens} tokens, τ {r.tau:.2f}, {r.tokens_per_s:.1f} tok/s, "
        f"{r.seconds:.1f} s, {r.finish_reason}]"
    )


def reply(engine: Dovetail, messages: list[dict[str, str]], cfg: dict[str, Any], icfg: InferConfig, out: TextIO) -> str:
    """Stream one reply to `out`; Ctrl-C stops the reply (what was written so far is kept), not the program."""
    stream = engine.stream(messages, stop=cfg.get("stop"), infer=icfg)  # icfg: reply_config(cfg)
    parts = []
    try:
        for delta in stream:
            parts.append(delta)
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    if stream.result is not None and cfg.get("status", True):
        print(status_line(stream.result), file=sys.stderr, flush=True)
    return "".join(parts)


def run_chat(cfg: dict[str, Any], stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    engine, icfg = build_engine(cfg)
    system = [{"role": "system", "content": cfg["system"]}] if cfg.get("system") else []
    messages = list(system)
    if cfg.get("prompt"):
        reply(engine, [*messages, {"role": "user", "content": str(cfg["prompt"])}], cfg, icfg, out)
        return
    interactive = stdin.isatty()
    if interactive:
        print("Dovetail chat: /reset starts over, /exit quits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            if interactive:
                out.write("> ")
                out.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return
        if not line:
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(system)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = reply(engine, messages, cfg, icfg, out)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})

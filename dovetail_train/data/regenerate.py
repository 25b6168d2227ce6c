"""Self-distillation: the target writes the assistant replies, greedily, in its own dtype.

Each conversation is cut after its last user turn (earlier turns, given replies included, stay as context)
and the target's greedy reply replaces whatever followed. Prompts are sorted by length and decoded in
left-padded batches, either with our `LlamaModel` over a static batched `KVCache` (`engine="static"`) or with
transformers `generate` on `target.hf_model()` (`engine="hf"`). Results go to
`<cache_dir>/regen-<key>/part.jsonl`, one line per reply, appended and fsynced per batch, so a rerun with
the same target, prompts, max_new_tokens and dtype reuses them and a killed run resumes where it stopped.
A line that does not parse (a half-written tail) is dropped with a warning, with everything after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dovetail_infer.kv_cache import KVCache
from dovetail_infer.outdir import file_lock
from dovetail_train.data.conversations import Conversation

log = logging.getLogger(__name__)

ENGINES = ("static", "hf")


def prompt_ids(target: Any, conversations: Sequence[Conversation]) -> list[list[int]]:
    """Chat-template ids of each conversation up to its last user turn, with the generation prompt."""
    return [target.apply_chat_template(c.prompt_messages(), add_generation_prompt=True) for c in conversations]


def regen_key(target: Any, prompts: list[list[int]], max_new_tokens: int, engine: str) -> str:
    """Hash of what the replies depend on: target identity (incl. template hash), dtype, prompts, length."""
    h = hashlib.sha256()
    head = [target.identity(), str(target.dtype), max_new_tokens, engine, target.eos_ids]
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for p in prompts:
        h.update(json.dumps(p).encode() + b"\n")
    return h.hexdigest()[:16]


def read_part(path: Path) -> dict[int, dict[str, Any]]:
    """Finished replies by prompt index; a torn or corrupt line and all after it are cut off the file."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline (half-written)")
                rec = json.loads(line)
                if not isinstance(rec, dict) or set(rec) != {"i", "ids", "eos"}:
                    raise ValueError(f"unexpected fields {sorted(rec) if isinstance(rec, dict) else type(rec)}")
            except ValueError as err:
                log.warning("%s: dropping a corrupt line at byte %d (%s) and everything after it", path, good, err)
                break
            done[int(rec["i"])] = rec
            good += len(line)
    if good != path.stat().st_size:
        with open(path, "rb+") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return done


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and the (B, P) bool mask of real tokens."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, P - len(p) :] = torch.tensor(p)
        valid[r, P - len(p) :] = True
    return ids, valid


@torch.inference_mode()
def greedy_static(target: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Batched greedy decoding on our LlamaModel with a static KV cache; left padding is handled with a
    key-validity mask and per-row RoPE positions. Returns new tokens per row (EOS kept, padding stripped)."""
    model, eos = target.model, torch.tensor(target.eos_ids or [-1])
    ids, valid_p = _left_pad(prompts, int(eos[0]) if eos[0] >= 0 else 0)
    B, P = ids.shape
    cache = KVCache.for_model(target.config, P + max_new_tokens, batch=B, dtype=target.dtype, device=target.device)
    valid = torch.ones((B, P + max_new_tokens), dtype=torch.bool)
    valid[:, :P] = valid_p
    pos = (valid_p.long().cumsum(1) - 1).clamp(min=0)  # (B, P): real tokens at 0..len-1
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    # pad queries see only themselves (an all-False row would give NaN); real queries skip pad keys
    mask = (causal & valid_p[:, None, :]) | torch.eye(P, dtype=torch.bool)
    dev = target.device
    h = model(ids.to(dev), positions=pos.to(dev), mask=mask[:, None].to(dev), cache=cache, start=0)
    next_pos = pos[:, -1] + 1
    out = torch.zeros((B, max_new_tokens), dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    alive = torch.arange(B)  # original row of each cache row
    fin = torch.zeros(B, dtype=torch.bool)  # cache rows that produced EOS (computed on until compacted away)
    for t in range(max_new_tokens):
        tok = model.logits(h[:, -1]).argmax(-1).cpu()
        live = alive[~fin]
        out[live, t] = tok[~fin]
        lengths[live] = t + 1
        fin |= torch.isin(tok, eos)
        if bool(fin.all()) or t + 1 == max_new_tokens:
            break
        if int(fin.sum()) * 8 >= len(fin):  # drop finished rows from the batch (and the cache)
            keep = (~fin).nonzero().squeeze(1)
            cache.keep_rows(keep.to(dev))
            valid, next_pos, alive, tok, fin = valid[keep], next_pos[keep], alive[keep], tok[keep], fin[keep]
        start = P + t
        m = valid[:, None, None, : start + 1].to(dev)
        h = model(tok[:, None].to(dev), positions=(next_pos + t)[:, None].to(dev), mask=m, cache=cache, start=start)
    return [out[r, : lengths[r]].tolist() for r in range(B)]


@torch.inference_mode()
def greedy_hf(target: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Batched greedy decoding with transformers `generate` (left padding) on the same weights."""
    hf, eos = target.hf_model(), target.eos_ids
    pad = eos[0] if eos else 0
    ids, valid = _left_pad(prompts, pad)
    out = hf.generate(
        input_ids=ids.to(target.device),
        attention_mask=valid.long().to(target.device),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=pad,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return [_strip(row, eos) for row in out[:, ids.shape[1] :].tolist()]


def _strip(row: list[int], eos: list[int]) -> list[int]:
    """Cut a generated row after its first EOS (padding after it goes)."""
    for j, t in enumerate(row):
        if t in eos:
            return row[: j + 1]
    return row


def regenerate(
    target: Any,
    conversations: Sequence[Conversation],
    cache_dir: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    engine: str = "static",
    progress: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[Conversation]:
    """Conversations whose final reply the target wrote (greedy, target dtype), cached and resumable.

    Returns one Conversation per input that fits, in input order: the prompt messages (up to the last user turn)
    followed by the target's reply, EOS and special tokens removed from the text. A prompt longer than
    `max_prompt_tokens` or than the target's context minus `max_new_tokens` is skipped (logged, not returned): one
    over-long row must not exhaust memory or fail the run.
    """
    if engine not in ENGINES:
        raise ValueError(f"regenerate engine must be one of {ENGINES}, got {engine!r}")
    limit = int(target.config.max_position_embeddings) - max_new_tokens
    limit = min(limit, max_prompt_tokens) if max_prompt_tokens else limit
    prompts = prompt_ids(target, conversations)
    keep = [i for i, p in enumerate(prompts) if len(p) <= limit]
    if len(keep) < len(prompts):
        longest = max(len(p) for p in prompts)
        log.warning("regenerate: %d of %d prompts longer than %d tokens skipped (longest %d)",
                    len(prompts) - len(keep), len(prompts), limit, longest)  # fmt: skip
        conversations, prompts = [conversations[i] for i in keep], [prompts[i] for i in keep]
    folder = Path(cache_dir) / f"regen-{regen_key(target, prompts, max_new_tokens, engine)}"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock", f"regeneration cache {folder}"):
        return _regenerate_locked(target, conversations, prompts, folder, engine, max_new_tokens, batch_size, progress)


def _regenerate_locked(target, conversations, prompts, folder: Path, engine, max_new_tokens, batch_size, progress):
    decode = greedy_static if engine == "static" else greedy_hf
    part = folder / "part.jsonl"
    meta = {"target": target.identity(), "dtype": str(target.dtype), "max_new_tokens": max_new_tokens}
    (folder / "meta.json").write_text(json.dumps({**meta, "engine": engine, "n": len(prompts)}, indent=1))
    done = read_part(part)
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: len(prompts[i]))
    if done:
        log.info("regenerate: %d/%d replies cached in %s", len(done), len(prompts), folder)
    new_tokens, t0 = 0, time.perf_counter()
    with tqdm(total=len(prompts), initial=len(done), unit="reply", desc="regenerate", disable=not progress) as bar:
        for b in range(0, len(todo), batch_size):
            idx = todo[b : b + batch_size]
            replies = decode(target, [prompts[i] for i in idx], max_new_tokens)
            recs = [{"i": i, "ids": r, "eos": bool(r) and r[-1] in target.eos_ids} for i, r in zip(idx, replies)]
            _append(part, recs)
            done.update((r["i"], r) for r in recs)
            new_tokens += sum(len(r) for r in replies)
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    n_eos = sum(done[i]["eos"] for i in range(len(prompts)))
    log.info("regenerate: %d/%d replies ended with EOS (others hit max_new_tokens=%d)", n_eos, len(prompts),
             max_new_tokens)  # fmt: skip
    out = []
    for i, conv in enumerate(conversations):
        ids = done[i]["ids"][:-1] if done[i]["eos"] else done[i]["ids"]
        text = target.tokenizer.decode(ids, skip_special_tokens=True).strip()
        out.append(Conversation(conv.id, [*conv.prompt_messages(), {"role": "assistant", "content": text}]))
    return out

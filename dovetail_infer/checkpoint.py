"""Exported draft dirs: config.json + model.safetensors (trainable weights only) + dovetail.json.

A draft dir is self-describing: it rebuilds the draft without Hydra or Lightning and says which target
it was trained for, so a mismatch is refused before any decoding. Weights load from safetensors only:
nothing in a draft dir is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dovetail_infer.models.draft import DraftConfig, DraftModel

CONFIG, WEIGHTS, META = "config.json", "model.safetensors", "dovetail.json"
COUNTS = "token_counts.safetensors"  # target-token frequencies in the training replies (reduced draft vocab)
FORMAT_VERSION = 1


class DraftMismatchError(ValueError):
    """The draft was trained for another target (size, vocab, tokenizer or chat template)."""


def save_draft(
    draft: DraftModel,
    out_dir: str | Path,
    target_identity: dict[str, Any],
    summary: dict[str, Any] | None = None,
    token_counts: torch.Tensor | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()}
    check_finite(sd, f"draft to export to {out}")
    tmp = out / (WEIGHTS + ".tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)  # atomic: a crash never leaves a half-written weights file in place
    (out / CONFIG).write_text(json.dumps(draft.config.to_dict(), indent=2))
    if token_counts is not None:
        save_file({"counts": token_counts.detach().to(torch.int64).cpu().contiguous()}, out / COUNTS)
    meta = {
        "format_version": FORMAT_VERSION,
        "target": target_identity,
        "trainable_params": draft.num_trainable(),
        "summary": summary or {},
    }
    (out / META).write_text(json.dumps(meta, indent=2, default=str))
    return out


IDENTITY_KEYS = ("source_id", "n_layers", "hidden_size", "vocab_size", "template_hash")


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or Inf, naming the tensors: such a draft proposes garbage silently."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what}: non-finite values (NaN/Inf) in {len(bad)} tensor(s): {bad[:4]}")


def read_meta(draft_dir: str | Path) -> dict[str, Any]:
    """dovetail.json, checked: it must name the target the draft was trained for (the identity checks need it)."""
    path = Path(draft_dir) / META
    if not path.exists():
        raise FileNotFoundError(f"{draft_dir} is not a Dovetail draft dir: {META} is missing")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    target = meta.get("target") if isinstance(meta, dict) else None
    missing = [k for k in IDENTITY_KEYS if not isinstance(target, dict) or k not in target]
    if missing:
        raise ValueError(
            f"{path}: no target identity (missing target.{', target.'.join(missing)}): cannot check the draft "
            "against the target; export drafts with dovetail_infer.checkpoint.save_draft"
        )
    return meta


def check_compatible(
    meta: dict[str, Any], config: DraftConfig, target_identity: dict[str, Any], where: str = ""
) -> None:
    """Raise DraftMismatchError naming both sides when the draft does not fit the target."""
    trained = meta.get("target", {})
    problems = []
    for key in ("source_id", "n_layers", "hidden_size", "vocab_size", "template_hash"):
        if key in trained and key in target_identity and trained[key] != target_identity[key]:
            problems.append(f"{key}: draft {trained[key]!r} vs target {target_identity[key]!r}")
    if config.hidden_size != target_identity.get("hidden_size", config.hidden_size):
        problems.append(f"hidden_size: draft config {config.hidden_size} vs target {target_identity['hidden_size']}")
    if config.vocab_size != target_identity.get("vocab_size", config.vocab_size):
        problems.append(f"vocab_size: draft config {config.vocab_size} vs target {target_identity['vocab_size']}")
    if problems:
        raise DraftMismatchError(
            f"draft {where or ''} was trained for target {trained.get('name')!r} ({trained.get('source_id')}) but the "
            f"loaded target is {target_identity.get('name')!r} ({target_identity.get('source_id')}): "
            + "; ".join(problems)
        )


def load_draft(
    draft_dir: str | Path,
    target_identity: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[DraftModel, dict[str, Any]]:
    """Rebuild a draft from its dir; with `target_identity`, refuse a draft made for another target."""
    d = Path(draft_dir)
    for name in (CONFIG, WEIGHTS, META):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d} is not a Dovetail draft dir: {name} is missing")
        if (d / name).is_symlink() or not (d / name).is_file():
            raise ValueError(f"{d / name} must be a regular file (not a symlink or folder): copy the real file there")
    try:
        config = DraftConfig.from_dict(json.loads((d / CONFIG).read_text()))
    except (ValueError, TypeError) as e:  # bad JSON, unknown or missing keys, bad values
        raise ValueError(f"{d / CONFIG}: not a valid draft config ({e})") from e
    meta = read_meta(d)
    if target_identity is not None:
        check_compatible(meta, config, target_identity, where=str(d))
    try:
        sd = load_file(d / WEIGHTS)
    except Exception as e:  # a pickle or a corrupted file: safetensors refuses it without running code
        raise ValueError(f"{d / WEIGHTS} is not a valid safetensors file ({e})") from e
    check_finite(sd, str(d / WEIGHTS))
    draft = DraftModel(config)
    missing, unexpected = draft.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DraftMismatchError(
            f"{d / WEIGHTS} does not match its config.json (depth {config.depth}, fusion {config.fusion}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return draft.to(device=device, dtype=dtype).eval(), meta


def load_token_counts(draft_dir: str | Path) -> torch.Tensor | None:
    """Per-token counts of the target's vocabulary in the training replies, if the draft dir has them."""
    path = Path(draft_dir) / COUNTS
    if not path.exists():
        return None
    try:
        return load_file(path)["counts"]
    except Exception as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e})") from e


def frequent_token_ids(counts: torch.Tensor, size: int | None) -> torch.Tensor | None:
    """Ids of the `size` most frequent target tokens, sorted (EAGLE-3 style reduced draft vocabulary); None = all.

    One mapping for both sides: training computes its token loss over these ids and inference proposes from them.
    """
    V = counts.numel()
    if size is None or size >= V:
        return None
    if size < 1:
        raise ValueError(f"draft_vocab must be >= 1 (or null for the full vocabulary), got {size}")
    return counts.float().topk(size).indices.sort().values

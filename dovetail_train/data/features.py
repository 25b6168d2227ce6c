"""Target features (final-norm hidden states) for distillation: an offline sharded Arrow cache, or online.

Offline layout (`<cache_root>/features-<key>/`): `shard-00000.arrow`, ... (Arrow IPC stream files, the
format HF `datasets` memory-maps; `datasets.Dataset.from_file` opens one) with columns `index` (the
example's position in the input), `input_ids`, `loss_mask` and `hidden` (binary: a (T, D) array of
bf16/fp16 bytes), plus `manifest.json` listing every finished shard with rows, bytes and sha256.

Shard i holds examples [i*shard_rows, (i+1)*shard_rows); inside a shard rows are sorted by length and
run in token-budgeted batches. A shard is written to `*.tmp`, fsynced, renamed, then recorded in the
manifest, so a crash costs at most the shard in progress. On reuse, sizes are always checked and
checksums when `verify=True`; a bad shard is rebuilt (build) or reported by name (open).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from tqdm.auto import tqdm

from dovetail_infer.models.linear import PackedLinear
from dovetail_infer.models.llama import MLP, Attention, Block, LlamaModel, RMSNorm, rope_cos_sin
from dovetail_infer.models.target import file_sha256
from dovetail_infer.outdir import check_free_space, file_lock

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.int8())),
        ("hidden", pa.binary()),
    ]
)


class FeatureCacheError(RuntimeError):
    """A cache folder or shard that does not match its manifest."""


@torch.inference_mode()
def compute_features(target: Any, input_ids_batch: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states for right-padded ids (B, T) -> (B, T, D) in the target's dtype.

    Used online (`data.features=online`, inside the training step) and by the offline cache builder.
    """
    return target.model(input_ids_batch.to(target.device))


# the modules a decoder layer may hold for the compiled path; anything else (a quantized linear) extracts eagerly
_PLAIN = (nn.ModuleList, Block, Attention, MLP, RMSNorm, nn.Identity, nn.Linear, PackedLinear)


def _plain_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The target's decoder layers as plain `nn.Linear` blocks sharing its weights (no copy), or None when a
    layer holds anything else (quantized linears keep their own kernels and run eagerly)."""
    if not isinstance(model, LlamaModel) or not all(isinstance(m, _PLAIN) for m in model.layers.modules()):
        return None
    with torch.device("meta"):
        blocks = nn.ModuleList(Block(model.config) for _ in model.layers)
    state = {f"{i}.{k}": v for i, layer in enumerate(model.layers) for k, v in layer.state_dict().items()}
    blocks.load_state_dict(state, strict=True, assign=True)
    return blocks.requires_grad_(False)


def _block_forward(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return block(x, cos, sin)


def feature_forward(target: Any, compile: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward the offline cache builder runs: `compute_features`, or with `compile` one decoder block compiled
    once (dynamic shapes) and run for every layer, over plain linears sharing the target's weights.

    Fusing the norms, RoPE and activations makes extraction faster for a few seconds of compiling
    (`benchmarks/feature_extraction.py` measures both side by side). The compiled products keep intermediates in
    float32, so the features differ from the eager ones by bf16 rounding, no further from float32 ones.
    Targets it cannot compile (quantized linears, other model classes) run eagerly, and so does a first call whose
    compile fails (no C++ compiler, say), with a warning: extraction never stops for want of the faster path.
    """
    blocks = _plain_blocks(target.model) if compile else None
    if blocks is None:
        return lambda ids: compute_features(target, ids)
    model, step = target.model, torch.compile(_block_forward, dynamic=True)
    state = {"compiled_once": False, "eager": False}

    @torch.inference_mode()
    def compiled(ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        x = model.embed_tokens(ids)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T, device=ids.device).expand(B, T), x.dtype)
        for block in blocks:
            x = step(block, x, cos, sin)
        return model.norm(x)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        if not state["eager"]:
            try:
                out = compiled(input_ids.to(target.device))
                state["compiled_once"] = True
                return out
            except Exception as e:  # the first call compiles: no C++ compiler, an unsupported op, ...
                if state["compiled_once"]:
                    raise
                log.warning("compiling the feature extraction failed (%s: %s); extracting eagerly", type(e).__name__, e)
                state["eager"] = True
        return compute_features(target, input_ids)

    return forward


def data_hash(examples: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over every example's input_ids and loss_mask (order matters)."""
    h = hashlib.sha256()
    for ex in examples:
        ids = np.asarray(ex["input_ids"], dtype=np.int64)
        mask = np.asarray(ex["loss_mask"], dtype=np.int8)
        h.update(np.int64(len(ids)).tobytes() + ids.tobytes() + mask.tobytes())
    return h.hexdigest()


def cache_key(target: Any, examples: Sequence[Mapping[str, Any]], key: dict[str, Any], storage_dtype: str) -> dict:
    """Everything the features depend on: the target (identity incl. template hash, compute dtype), the
    tokenized data, the caller's fields (max_length, ...) and the storage dtype."""
    return {
        "format": FORMAT_VERSION,
        "target": target.identity(),
        "target_dtype": str(target.dtype).replace("torch.", ""),
        "data": data_hash(examples),
        "num_examples": len(examples),
        "storage_dtype": storage_dtype,
        **{f"user.{k}": v for k, v in sorted(key.items())},
    }


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Positions sorted by length, grouped so that rows * longest <= batch_tokens (at least one row)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[i] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _write_shard(forward, examples, indices: list[int], path: Path, dtype: torch.dtype, batch_tokens: int, bar) -> None:
    tmp = path.with_suffix(".arrow.tmp")
    lengths = [len(examples[i]["input_ids"]) for i in indices]
    pad = 0
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        for group in _batches(lengths, batch_tokens):
            rows = [indices[j] for j in group]
            T = max(lengths[j] for j in group)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : lengths[group[r]]] = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
            hidden = forward(ids).to("cpu", dtype).contiguous()
            blobs = [hidden[r, : lengths[group[r]]].view(torch.int16).numpy().tobytes() for r in range(len(rows))]
            batch = pa.record_batch(
                [
                    pa.array(rows, pa.int64()),
                    pa.array([list(map(int, examples[i]["input_ids"])) for i in rows], pa.list_(pa.int32())),
                    pa.array([list(map(int, examples[i]["loss_mask"])) for i in rows], pa.list_(pa.int8())),
                    pa.array(blobs, pa.binary()),
                ],
                schema=SCHEMA,
            )
            writer.write_batch(batch)
            bar.update(sum(lengths[j] for j in group))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_ok(folder: Path, entry: dict[str, Any], verify: bool) -> str | None:
    """None if the shard file matches its manifest entry, else why not."""
    path = folder / entry["file"]
    if not path.exists():
        return "missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"size {size} != manifest {entry['bytes']} (truncated or overwritten)"
    if verify and file_sha256(path) != entry["sha256"]:
        return "sha256 does not match the manifest (bytes changed)"
    return None


def build_feature_cache(
    target: Any,
    examples: Sequence[Mapping[str, Any]],
    cache_root: str | Path,
    key: dict[str, Any],
    storage_dtype: str = "bfloat16",
    shard_rows: int = 256,
    batch_tokens: int = 8192,
    verify: bool = True,
    progress: bool = True,
    compile: bool = True,
) -> FeatureCache:
    """Build (or reuse, or finish) the feature cache of `examples` (dicts with `input_ids`, `loss_mask`).

    `key` holds the caller's settings the data depends on (e.g. max_length, data source); it is hashed
    with the target identity, the tokenized data and the storage dtype to name the cache folder.
    Finished shards that match the manifest are kept; missing or corrupt ones are (re)built. `compile`: extract
    through `feature_forward`'s compiled block (eager when False or when the target cannot be compiled).
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    fields = cache_key(target, examples, key, storage_dtype)
    folder = Path(cache_root) / f"features-{_digest(fields)}"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock", f"feature cache {folder}"):
        return _build_locked(
            target, examples, folder, fields, storage_dtype, shard_rows, batch_tokens, verify, progress, compile
        )


def _build_locked(
    target, examples, folder: Path, fields, storage_dtype, shard_rows, batch_tokens, verify, progress, compile
):
    n_shards = (len(examples) + shard_rows - 1) // shard_rows
    manifest = {
        "version": FORMAT_VERSION,
        "key": fields,
        "storage_dtype": storage_dtype,
        "hidden_size": target.config.hidden_size,
        "shard_rows": shard_rows,
        "num_rows": len(examples),
        "num_shards": n_shards,
        "shards": {},
        "complete": False,
    }
    old_path = folder / MANIFEST
    if old_path.exists():
        old = json.loads(old_path.read_text())
        if old.get("key") == fields and old.get("shard_rows") == shard_rows:
            for name, entry in old["shards"].items():
                bad = _shard_ok(folder, entry, verify)
                if bad is None:
                    manifest["shards"][name] = entry
                else:
                    log.warning("feature cache %s: shard %s is %s; rebuilding it", folder, name, bad)
    todo = [s for s in range(n_shards) if f"shard-{s:05d}.arrow" not in manifest["shards"]]
    for stale in folder.glob("*.tmp"):
        stale.unlink()
    if todo:
        log.info("feature cache %s: building %d of %d shards", folder, len(todo), n_shards)
        dtype = STORAGE_DTYPES[storage_dtype]
        spans = [range(s * shard_rows, min(len(examples), (s + 1) * shard_rows)) for s in todo]
        total = sum(len(examples[i]["input_ids"]) for span in spans for i in span)
        need = int(total * (target.config.hidden_size * dtype.itemsize + 16) * 1.05)
        check_free_space(folder, need, f"the feature cache ({total} tokens)")
        forward = feature_forward(target, compile)
        with tqdm(total=total, unit="tok", desc="features", disable=not progress) as bar:
            for s, span in zip(todo, spans):
                name = f"shard-{s:05d}.arrow"
                _write_shard(forward, examples, list(span), folder / name, dtype, batch_tokens, bar)
                path = folder / name
                tokens = sum(len(examples[i]["input_ids"]) for i in span)
                manifest["shards"][name] = {
                    "file": name,
                    "rows": len(span),
                    "tokens": tokens,
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                }
                _write_json(old_path, manifest)
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    manifest["num_tokens"] = sum(e["tokens"] for e in manifest["shards"].values())
    manifest["complete"] = True
    _write_json(old_path, manifest)
    return FeatureCache(folder, manifest)


class FeatureCache:
    """A finished feature cache, memory-mapped. `cache[i]` is example i of the input the cache was built from."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        import datasets

        self.path = Path(path)
        self.manifest = manifest
        self.dtype = STORAGE_DTYPES[manifest["storage_dtype"]]
        self.hidden_size = int(manifest["hidden_size"])
        self.shards = [datasets.Dataset.from_file(str(self.path / e["file"])) for e in manifest["shards"].values()]
        # record batches stay separate memory-mapped chunks (combining them would copy); example i lives at
        # (shard, chunk, row) and is found through the `index` column
        self._chunks = [ds.data.table.to_batches() for ds in self.shards]
        n = manifest["num_rows"]
        self._where = np.full((n, 3), -1, dtype=np.int64)
        for s, batches in enumerate(self._chunks):
            for c, batch in enumerate(batches):
                idx = batch.column("index").to_numpy()
                self._where[idx] = np.stack([np.full_like(idx, s), np.full_like(idx, c), np.arange(len(idx))], 1)
        if (self._where[:, 0] < 0).any():
            raise FeatureCacheError(f"feature cache {self.path}: the shards do not cover all {n} rows of the manifest")

    def __reduce__(self):  # DataLoader workers (spawn) reopen the memory maps instead of pickling tables
        return FeatureCache, (self.path, self.manifest)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> FeatureCache:
        """Open a finished cache; always checks shard sizes, and sha256 checksums when `verify`."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            raise FeatureCacheError(f"{path} is not a feature cache (no {MANIFEST}); build it with build_feature_cache")
        manifest = json.loads(mpath.read_text())
        if not manifest.get("complete"):
            raise FeatureCacheError(f"feature cache {path} is unfinished; rerun build_feature_cache to complete it")
        for name, entry in manifest["shards"].items():
            bad = _shard_ok(path, entry, verify)
            if bad is not None:
                raise FeatureCacheError(
                    f"feature cache {path}: shard {name} is {bad}; delete it and rerun build_feature_cache to rebuild it"
                )
        return cls(path, manifest)

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def nbytes(self) -> int:
        return sum(e["bytes"] for e in self.manifest["shards"].values())

    @property
    def bytes_per_token(self) -> float:
        """On-disk bytes per token (hidden state plus ids, mask and Arrow overhead)."""
        return self.nbytes / max(1, self.num_tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"feature cache index {i} out of range for {len(self)} rows")
        i %= len(self)
        s, c, row = (int(x) for x in self._where[i])
        batch = self._chunks[s][c]
        ids = batch.column("input_ids")[row].values.to_numpy()
        mask = batch.column("loss_mask")[row].values.to_numpy()
        hidden = batch.column("hidden")
        offsets = np.frombuffer(hidden.buffers()[1], dtype=np.int32, count=len(hidden) + 1, offset=hidden.offset * 4)
        data = memoryview(hidden.buffers()[2])[offsets[row] : offsets[row + 1]]
        with warnings.catch_warnings():  # the buffer is a read-only memory map: zero-copy, never written
            warnings.simplefilter("ignore", UserWarning)
            h = torch.frombuffer(data, dtype=self.dtype) if len(data) else torch.empty(0, dtype=self.dtype)
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "loss_mask": torch.from_numpy(mask.astype(np.int64)),
            "hidden": h.view(len(ids), self.hidden_size),
        }

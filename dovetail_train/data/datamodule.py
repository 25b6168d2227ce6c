"""DistillDataModule: conversations -> (regenerated replies) -> tokens + loss mask -> features -> batches."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dovetail_infer.models.target import Target
from dovetail_train.data.conversations import load_conversations
from dovetail_train.data.features import FeatureCache, build_feature_cache
from dovetail_train.data.regenerate import regenerate
from dovetail_train.data.tokenize import tokenize_conversation

log = logging.getLogger(__name__)


class TokenDataset(Dataset):
    """Tokens and loss masks only (online features: the target runs inside the training step)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        return {"input_ids": torch.tensor(ex["input_ids"]), "loss_mask": torch.tensor(ex["loss_mask"])}


class Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


class ResumableSampler(DistributedSampler):
    """Shuffles by (seed, epoch) like DistributedSampler (rank-sharded under DDP, so Lightning keeps it as is);
    `skip` drops the first examples of one epoch's order: the ones trained on before a mid-epoch resume.

    Given `lengths` and `batch_size`, batches are length-grouped: the shuffled order is cut into windows of
    `group` batches, each window is sorted by length and cut into batches, and the batches are shuffled. A batch
    then pads its rows to a similar length (the draft runs over every position, padding included) while every
    example is still seen once per epoch in a seeded order.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: list[int] | None = None,
        batch_size: int = 1,
        group: int = 32,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {len(dataset)}")
        self.lengths, self.batch_size, self.group = lengths, int(batch_size), int(group)
        self.skip: dict[int, int] = {}  # epoch -> examples of this rank's order to skip once

    def __iter__(self):
        order = list(super().__iter__())
        if self.lengths is not None and self.batch_size > 1:
            order = self._grouped(order)
        return iter(order[self.skip.pop(self.epoch, 0) :])

    def _grouped(self, order: list[int]) -> list[int]:
        window, bs = self.batch_size * self.group, self.batch_size
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[b : b + bs] for b in range(0, len(chunk), bs)]
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(batches)
        return [i for b in batches for i in b]


class ResumableLoader(DataLoader):
    """A training DataLoader whose position in the epoch goes into Lightning checkpoints.

    Lightning saves `state_dict()` of a loader that has one and calls `load_state_dict()` on resume, so a
    run killed mid-epoch continues with the very next batch of the same shuffled order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self._epoch, self._batches = 0, 0

    def __iter__(self):  # a generator: the sampler's epoch is read at the first batch, after set_epoch
        sampler: ResumableSampler = self.sampler
        self._epoch = sampler.epoch
        self._batches = sampler.skip.get(sampler.epoch, 0) // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches, "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["batch_size"] != self.batch_size:
            raise ValueError(
                f"the checkpoint was trained with data.batch_size={state['batch_size']}, now {self.batch_size}: "
                "resume with the same batch size"
            )
        if 0 < state["batches"] < len(self):  # a finished epoch needs no skipping
            self.sampler.skip = {state["epoch"]: state["batches"] * self.batch_size}


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padding has loss_mask and valid_mask 0 (and zero features)."""
    T = max(r["input_ids"].shape[0] for r in rows)
    B = len(rows)
    out = {name: torch.zeros(B, T, dtype=torch.float32) for name in ("loss_mask", "valid_mask")}
    out["input_ids"] = torch.zeros(B, T, dtype=torch.long)
    if "hidden" in rows[0]:
        out["hidden"] = torch.zeros(B, T, rows[0]["hidden"].shape[-1], dtype=rows[0]["hidden"].dtype)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[0]
        out["input_ids"][i, :n] = r["input_ids"]
        out["loss_mask"][i, :n] = r["loss_mask"].float()
        out["valid_mask"][i, :n] = 1.0
        if "hidden" in out:
            out["hidden"][i, :n] = r["hidden"]
    return out


def check_data_config(c: dict[str, Any]) -> None:
    """The data settings' own errors, named by key: raised before any model loads (`pipeline.train` calls it first)."""
    path, name = c.get("path"), c.get("name", "data")
    features, val_fraction = c.get("features", "offline"), c.get("val_fraction", 0.1)
    if not path or str(path) in ("???", "None", "null"):
        raise ValueError(
            f"data.path is required for data={name}: pass data.path=FILE (ShareGPT JSON/JSONL or HF dataset folder)"
        )
    if features not in ("offline", "online"):
        raise ValueError(f"data.features must be 'offline' or 'online', got {features!r}")
    for key in ("max_length", "batch_size", "max_new_tokens", "regen_batch_size"):
        value = c.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {value!r}")
    if c.get("limit") is not None and (not isinstance(c["limit"], int) or c["limit"] < 1):
        raise ValueError(f"data.limit must be null or a positive integer, got {c['limit']!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")


class DistillDataModule(L.LightningDataModule):
    """Conversations -> (regenerated replies) -> tokenized examples -> cached target features -> batches. The
    defaults are conf/data/default.yaml's (and conf/train.yaml's seed); tests/test_defaults.py checks them."""

    def __init__(
        self,
        target: Target,
        path: str,
        cache_dir: str,
        name: str = "data",
        regenerate: bool = True,
        max_new_tokens: int = 128,
        regen_batch_size: int = 64,
        limit: int | None = None,
        max_length: int = 512,
        val_fraction: float = 0.1,
        val_max_rows: int | None = 64,
        features: str = "offline",
        storage_dtype: str = "bfloat16",
        verify_cache: bool = True,
        compile_features: bool = True,
        batch_size: int = 8,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        check_data_config(dict(locals()))
        self.target = target
        self.cfg = dict(locals())
        for k in ("self", "target", "__class__"):
            self.cfg.pop(k, None)
        self.summary: dict[str, Any] = {}
        self.token_counts: torch.Tensor | None = None
        self._dataset: Dataset | None = None
        self._lengths: list[int] = []

    def _examples(self) -> list[dict[str, list[int]]]:
        c = self.cfg
        path = Path(c["path"]).expanduser()
        convs, report = load_conversations(path, limit=c["limit"], require_reply=not c["regenerate"])
        self.summary.update(data_path=str(path), rows=len(convs), skipped=dict(report.counts))
        skipped = self.summary["skipped"]
        if c["regenerate"]:
            n_in = len(convs)
            convs = regenerate(
                self.target,
                convs,
                cache_dir=Path(c["cache_dir"]) / "regenerated",
                max_new_tokens=c["max_new_tokens"],
                batch_size=c["regen_batch_size"],
                max_prompt_tokens=c["max_length"] - 1,  # at least one reply token must fit in an example
            )
            if n_in > len(convs):
                skipped["prompt_too_long"] = n_in - len(convs)
        examples = []
        for conv in convs:
            ex = tokenize_conversation(self.target, conv.messages, max_length=c["max_length"])
            if sum(ex["loss_mask"][1:]) > 0:
                examples.append(ex)
            else:
                skipped["no_reply_within_max_length"] = skipped.get("no_reply_within_max_length", 0) + 1
        if skipped:
            log.warning("data: skipped rows by reason: %s", skipped)
        if not examples:
            raise ValueError(f"{path}: no conversation has assistant tokens within data.max_length={c['max_length']}")
        self._lengths = [len(e["input_ids"]) for e in examples]
        self.summary.update(examples=len(examples), tokens=sum(self._lengths))
        self.summary["assistant_tokens"] = sum(sum(e["loss_mask"]) for e in examples)
        # how often the target writes each token: a reduced draft vocabulary keeps the most frequent ones
        assistant = [t for e in examples for t, m in zip(e["input_ids"], e["loss_mask"]) if m]
        self.token_counts = torch.bincount(
            torch.tensor(assistant, dtype=torch.long), minlength=self.target.config.vocab_size
        )
        log.info(
            "data: %d examples, %d tokens (%d assistant)",
            len(examples),
            self.summary["tokens"],
            self.summary["assistant_tokens"],
        )
        return examples

    def _cache_key(self) -> dict[str, Any]:
        c = self.cfg
        keys = ("limit", "regenerate", "max_new_tokens", "max_length", "storage_dtype")
        path = str(Path(c["path"]).expanduser().resolve())  # the same file from any working dir: the same cache
        return {
            "target": self.target.identity(),
            "dtype": str(self.target.dtype),
            "path": path,
            **{k: c[k] for k in keys},
        }

    def prepare_data(self) -> None:
        """Runs once per node (rank 0): builds every cache, so setup() on all ranks only opens them."""
        self._build()

    def _build(self) -> Dataset:
        if self._dataset is not None:
            return self._dataset
        examples = self._examples()
        if self.cfg["features"] == "online":
            self._dataset = TokenDataset(examples)
        else:
            cache: FeatureCache = build_feature_cache(
                self.target,
                examples,
                cache_root=Path(self.cfg["cache_dir"]) / "features",
                key=self._cache_key(),
                storage_dtype=self.cfg["storage_dtype"],
                verify=self.cfg["verify_cache"],
                compile=self.cfg["compile_features"],
            )
            self.summary.update(feature_cache=str(cache.path), bytes_per_token=cache.bytes_per_token)
            self._dataset = cache
        return self._dataset

    def setup(self, stage: str | None = None) -> None:
        ds = self._build()
        idx = list(range(len(ds)))
        random.Random(self.cfg["seed"]).shuffle(idx)
        n_val = max(1, round(len(idx) * self.cfg["val_fraction"]))
        if self.cfg["val_max_rows"]:
            n_val = min(n_val, self.cfg["val_max_rows"])
        if len(idx) < 2:
            raise ValueError(f"need at least 2 usable examples for a train/val split, got {len(idx)}")
        self.val_set, self.train_set = Subset(ds, idx[:n_val]), Subset(ds, idx[n_val:])
        self._train_lengths = [self._lengths[i] for i in idx[n_val:]]
        self.summary.update(train_examples=len(self.train_set), val_examples=len(self.val_set))

    def train_batches(self, world_size: int = 1) -> int:
        """Batches per epoch on each rank (what the train loader will yield), without building the loader."""
        per_rank = -(-len(self.train_set) // world_size)
        return -(-per_rank // self.cfg["batch_size"])

    def heldout_prompts(self, n: int) -> list[list[int]]:
        """Up to n prompts of the validation split (never trained on): each example's tokens before its first
        assistant token, i.e. the chat-templated prompt with the assistant header."""
        prompts = []
        for i in range(len(self.val_set)):
            ex = self.val_set[i]
            mask = ex["loss_mask"].tolist()
            if 1 in mask[1:]:
                prompts.append(ex["input_ids"][: mask.index(1, 1)].tolist())
            if len(prompts) == n:
                break
        return prompts

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        bs = self.cfg["batch_size"]
        lengths = self._train_lengths if self.cfg["group_by_length"] else None
        return ResumableLoader(
            self.train_set,
            batch_size=bs,
            sampler=ResumableSampler(self.train_set, self.cfg["seed"], replicas, rank, lengths=lengths, batch_size=bs),
            collate_fn=collate,
            num_workers=self.cfg["num_workers"],
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.cfg["batch_size"], collate_fn=collate, num_workers=self.cfg["num_workers"]
        )

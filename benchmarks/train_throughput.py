"""Training tokens/s: the previous training step (reference) against today's default (contender), side by side.

    python benchmarks/train_throughput.py [--examples 64] [--rounds 3] [--out FILE]

Every row trains the same depth-4 DGF draft (same init, AdamW, bf16 autocast, clipping) on the same real examples:
the self-distilled ShareGPT set's feature cache (`experiment=cpu_draft`'s data; built on first use, ~10 min).
Rows take turns round by round in one process (this machine's speed drifts) and the median is reported.

- reference: the step before the speed-up: token loss over the full 49,152-token vocabulary, shuffled batches of 8
  padded to their longest row;
- one lever at a time on top of it (draft vocabulary, length-grouped batches, a compiled draft);
- contender: the new default (`loss.draft_vocab=8192`, `data.group_by_length=true`, `compile=true`), and two
  variants of it (batch 16, draft vocabulary 4096).

tokens/s counts real (unpadded) tokens, the unit of the data. The JSON has `tokens_per_s` per row, `speedup`
(contender / reference) and `peak_share`: the contender's useful FLOP rate over this CPU's bf16 matmul peak,
measured in the same run with a large square product.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, stamp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dovetail_infer.checkpoint import frequent_token_ids
from dovetail_infer.models.draft import DraftConfig
from dovetail_infer.models.target import load_target
from dovetail_train.data.datamodule import DistillDataModule, ResumableSampler, collate
from dovetail_train.module import DistillModule

ROWS = {  # name: (draft_vocab, group_by_length, batch_size, compile)
    "reference": (None, False, 8, False),
    "+ draft_vocab=8192": (8192, False, 8, False),
    "+ group_by_length": (None, True, 8, False),
    "+ compile": (None, False, 8, True),
    "contender": (8192, True, 8, True),
    "contender, batch 16": (8192, True, 16, True),
    "contender, draft_vocab=4096": (4096, True, 8, True),
}


def load_data(n: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cpu_draft", f"paths.root_dir={ROOT}"])
    target = load_target(OmegaConf.to_container(cfg.target, resolve=True))
    data = OmegaConf.to_container(cfg.data, resolve=True)
    dm = DistillDataModule(target=target, seed=cfg.seed, **data)
    dm.prepare_data()
    dm.setup()
    examples = [dm.train_set[i] for i in range(n)]
    return target, dm, examples


def batches_for(examples, batch_size: int, grouped: bool) -> list[dict[str, torch.Tensor]]:
    lengths = [len(e["input_ids"]) for e in examples]
    sampler = ResumableSampler(examples, seed=0, lengths=lengths if grouped else None, batch_size=batch_size)
    order = list(sampler)
    return [collate([examples[i] for i in order[b : b + batch_size]]) for b in range(0, len(order), batch_size)]


def draft_flops_per_token(cfg: DraftConfig, vocab: int, assistant_share: float) -> float:
    """Useful FLOPs per real token of one training step: the draft's products forward and backward (x3), the
    token loss's head products (target and draft logits forward, draft backward) on assistant tokens."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.n_kv_heads * cfg.head_dim
    layer = 2 * d * d + 2 * d * kv + 3 * d * f
    params = cfg.depth * layer + 4 * d * d
    return 2 * 3 * params + assistant_share * 2 * 3 * vocab * d


def peak_bf16_flops(n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run_row(target, dm, examples, name: str, depth: int) -> tuple[float, int, float]:
    vocab_size, grouped, bs, compiled = ROWS[name]
    torch.manual_seed(0)
    cfg = DraftConfig.from_target(target.config, depth=depth)
    vocab = frequent_token_ids(dm.token_counts, vocab_size) if vocab_size else None
    module = DistillModule(
        cfg, target.embed.weight, target.lm_head.weight, sim_tau_steps=0, vocab_ids=vocab, compile=compiled
    )
    opt = torch.optim.AdamW(module.draft.parameters(), lr=1e-3, betas=(0.9, 0.95))
    batches = batches_for(examples, bs, grouped)
    tokens = sum(len(e["input_ids"]) for e in examples)
    padded = sum(b["input_ids"].numel() for b in batches)
    t = time.perf_counter()
    for i, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.compute(batch, "train", i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.draft.parameters(), 0.5)
        opt.step()
    return time.perf_counter() - t, tokens, padded / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--examples", type=int, default=64, help="training examples per row and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", default=str(RESULTS / "train_throughput" / "train_throughput.json"))
    args = ap.parse_args()
    target, dm, examples = load_data(args.examples)
    seconds: dict[str, list[float]] = {r: [] for r in args.rows}
    padding: dict[str, float] = {}
    tokens = 0
    compile_s = {}
    for name in args.rows:  # warm-up (and the compiled rows' compile) outside the timed rounds
        compile_s[name] = round(run_row(target, dm, examples[:16], name, args.depth)[0], 1)
    for _ in range(args.rounds):
        for name in args.rows:
            s, tokens, pad = run_row(target, dm, examples, name, args.depth)
            seconds[name].append(s)
            padding[name] = round(pad, 3)
            print(f"{name}: {tokens / s:.0f} tok/s", flush=True)
    tps = {r: tokens / statistics.median(v) for r, v in seconds.items()}
    assistant = sum(int(e["loss_mask"].sum()) for e in examples) / tokens
    cfg = DraftConfig.from_target(target.config, depth=args.depth)
    flops = draft_flops_per_token(cfg, ROWS["contender"][0], assistant)
    peak = peak_bf16_flops()
    result = {
        **stamp(),
        "depth": args.depth,
        "examples": args.examples,
        "tokens_per_round": tokens,
        "assistant_share": round(assistant, 3),
        "rows": {r: ROWS[r] for r in args.rows},
        "tokens_per_s": {r: round(v, 1) for r, v in tps.items()},
        "padded_per_token": padding,
        "speedup": round(tps["contender"] / tps["reference"], 2) if {"contender", "reference"} <= tps.keys() else None,
        "useful_gflops": round(flops * tps.get("contender", 0) / 1e9, 1),
        "peak_bf16_gflops": round(peak / 1e9, 1),
        "peak_share": round(flops * tps.get("contender", 0) / peak, 3),
        "seconds": seconds,
        "warmup_seconds": compile_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "speedup", "peak_share", "padded_per_token")}, indent=2))


if __name__ == "__main__":
    main()

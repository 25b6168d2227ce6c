"""What the benchmarks share: the provenance stamp written into every result JSON, and the decoding runners the
speed comparisons race side by side (`speed.py`, `llamacpp_race.py`).

Benchmarks are scripts run from the repository root (`python benchmarks/<name>.py ...`); they import this module
as `common`, their own folder being first on the import path."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from dovetail_infer.bench import KNOWN_BENCHES, conversation, load_bench
from dovetail_infer.engine import Dovetail, GenerationResult, InferConfig
from dovetail_infer.models.target import Target, load_target, spec_from_yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stamp() -> dict[str, Any]:
    """Commit (with a `+dirty` mark for uncommitted changes), torch version, CPU model, threads, UTC date."""
    commit = _git("rev-parse", "--short=12", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "commit": commit,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ---- decoding runners: one prompt's ids in, its new tokens and decoding time out ------------------------


class Run(NamedTuple):
    ids: list[int]  # new tokens
    seconds: float  # decoding time (prefill excluded)
    result: GenerationResult | None = None  # our engine's rows: forwards, tau and the time split


Runner = Callable[[list[int]], Run]  # prompt ids -> one decoding


def run_interleaved(
    runners: dict[str, Runner],
    prompts: list[list[int]],
    runs: int,
    after_pass: Callable[[int, dict[str, list[float]], dict[str, list[Run]]], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[Run]]]:
    """`runs` passes; within a pass the rows take turns prompt by prompt (this machine's speed drifts within
    minutes, so every row sees the same moments). Returns each row's tokens/s per pass (mean over prompts)
    and its runs of the last pass; `after_pass(passes done, those, these)` runs after each pass."""
    passes: dict[str, list[float]] = {k: [] for k in runners}
    last: dict[str, list[Run]] = {}
    for i in range(runs):
        res: dict[str, list[Run]] = {k: [] for k in runners}
        for p in tqdm(prompts, desc=f"pass {i + 1}/{runs} ({len(runners)} rows)", unit="prompt"):
            for name, run in runners.items():
                res[name].append(run(p))
        for name, r in res.items():
            passes[name].append(statistics.mean(len(x.ids) / x.seconds for x in r))
        last = res
        if after_pass is not None:
            after_pass(i + 1, passes, last)
    return passes, last


def target_for(name: str, dtype: str, **overrides) -> Target:
    yaml = ROOT / "conf" / "target" / f"{name}.yaml"
    return load_target(spec_from_yaml(yaml, ROOT / "data" / "cache", dtype=dtype, **overrides))


def hf_runner(target: Target, n: int, **gen_kwargs) -> Runner:
    hf = target.hf_model()

    def run(ids: list[int]) -> Run:
        x = torch.tensor([ids])
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=target.eos_ids[0], **gen_kwargs)
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, **kw)  # prefill + first token, subtracted below
        t1 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, **kw)[0, len(ids) :].tolist()
        t2 = time.perf_counter()
        return Run(out, max(t2 - t1 - (t1 - t0), 1e-9))

    return run


def engine_runner(engine: Dovetail, cfg: InferConfig, baseline: bool = False) -> Runner:
    def run(ids: list[int]) -> Run:
        r = engine.generate_baseline(ids, cfg) if baseline else engine.generate(ids, cfg)
        return Run(r.output_ids, r.decode_s, r)

    return run


def llamacpp_runner(gguf: Path, n: int, threads: int) -> Runner | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)

    def run(ids: list[int]) -> Run:
        llm.reset()
        out, t0 = [], None
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if t0 is None:
                t0 = time.perf_counter()  # the first token comes after prefill
            out.append(int(tok))
            if tok == llm.token_eos() or len(out) >= n:
                break
        return Run(out, max(time.perf_counter() - (t0 or time.perf_counter()), 1e-9))

    return run


def bench_prompts(target: Target, per_bench: int, root: Path) -> list[list[int]]:
    prompts = []
    for name in KNOWN_BENCHES:
        if name in ("custom", "humaneval_pkg"):
            continue
        for q in load_bench(name, str(root), None, per_bench):
            prompts.append(target.apply_chat_template(conversation(q, [], 0)))
    return prompts

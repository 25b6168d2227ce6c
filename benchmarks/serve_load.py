"""Load on the OpenAI-compatible server: N streamed chat requests at concurrency C, with and without the draft.

Per row: latency and time to first token (p50/p95, seconds, queue wait included), aggregate throughput (completion
tokens / wall time), τ, errors, and three per-request speeds (medians):

- `request`: completion tokens / (latency - queue wait), client side: prefill, first token and HTTP included;
- `engine`: the server's own timer (the reply's `dovetail.tokens_per_s`, prefill included), the same timer
  `Dovetail.chat` reports in-process;
- `decode`: tokens after the first text / time from the first text to the reply's last chunk, client side:
  decoding alone, without queue wait, prefill or time to first token.

Unless `--url` is given, the script serves each row itself (`conf/serve.yaml` plus the overrides after `--`, as
`python serve.py` would) on a free localhost port, after decoding the first `--inprocess` prompts in-process with
`Dovetail.stream` (a warm-up first, as the served run has), timed the same two ways (`inprocess_*`). The comparisons
(`*_vs_inprocess`: served / in-process) use only the served requests of those same prompts. The load client runs in a
process of its own (`--client-in-process`: in the server's process, sharing its interpreter lock and event loop
thread budget with the decoding thread, as before).

    python benchmarks/serve_load.py --requests 100 --concurrency 8 --max-tokens 64
    python benchmarks/serve_load.py --requests 4 --concurrency 2 --max-tokens 8 -- target=tiny_random ckpt=null
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --label remote   # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, stamp

from dovetail_infer.bench import conversation, load_bench

BENCHES = ("mt_bench", "humaneval", "gsm8k", "alpaca", "sum", "qa")
SPEEDS = ("request", "engine", "decode")


def prompts(per_bench: int) -> list[list[dict[str, str]]]:
    root = ROOT / "data" / "bench"
    return [conversation(q, [], 0) for name in BENCHES for q in load_bench(name, root, None, per_bench)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 4)


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def after_first(tokens: int, first: float | None, done: float | None) -> float | None:
    """Tokens per second after the first text: decoding alone (no queue wait, prefill or first token)."""
    if first is None or done is None or done <= first or tokens < 2:
        return None
    return (tokens - 1) / (done - first)


async def one_request(http: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat request: latency, TTFT, the time of the last chunk, tokens, the server's stats, or the
    error (times in seconds from sending it)."""
    body = {"model": "dovetail", "messages": messages, "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"error": None, "ttft": None, "done": None, "tokens": 0, "stats": None}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                out["error"] = f"HTTP {r.status_code}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"].get("code") or "error event"
                for c in chunk.get("choices") or []:
                    if c.get("delta", {}).get("content") and out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
                if chunk.get("dovetail"):  # the chunk with finish_reason: the reply's last text is in
                    out["stats"], out["done"] = chunk["dovetail"], time.perf_counter() - t0
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = type(e).__name__
    out["latency"] = time.perf_counter() - t0
    return out


def served_speeds(r: dict[str, Any]) -> dict[str, float | None]:
    """The three per-request speeds of one served request (see the module docstring)."""
    stats = r["stats"] or {}
    queue_s = stats.get("queue_s")
    request = r["tokens"] / (r["latency"] - queue_s) if queue_s is not None and r["latency"] > queue_s else None
    return {
        "request": request,
        "engine": stats.get("tokens_per_s"),
        "decode": after_first(r["tokens"], r["ttft"], r["done"]),
    }


def summary(results: list[dict[str, Any]], wall: float, paired: int) -> dict[str, Any]:
    """A row's figures; `paired`: the first prompts, also decoded in-process, whose requests the comparisons use."""
    ok = [r for r in results if r["error"] is None]
    errors: dict[str, int] = {}
    for r in results:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    speeds = [served_speeds(r) for r in ok]
    same = [served_speeds(r) for r in ok if r["prompt"] < paired]
    taus = [r["stats"]["tau"] for r in ok if r["stats"] and r["stats"]["forwards"]]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
    row = {
        "requests": len(results),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": round(wall, 3),
        "latency_p50_s": pct(lat, 0.5),
        "latency_p95_s": pct(lat, 0.95),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall > 0 else None,
        "tau_mean": round(statistics.mean(taus), 3) if taus else None,
        "completion_tokens": sum(r["tokens"] for r in ok),
    }
    for k in SPEEDS:
        row[f"{k}_tokens_per_s_median"] = median([s[k] for s in speeds])
        if paired:
            row[f"paired_{k}_tokens_per_s_median"] = median([s[k] for s in same])
    return row


async def load(url: str, convs: list, n: int, c: int, max_tokens: int, paired: int = 0) -> dict[str, Any]:
    sem = asyncio.Semaphore(c)
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        await one_request(http, convs[0], max_tokens)  # warm-up, not counted

        async def run(i: int) -> dict[str, Any]:
            async with sem:
                return {**await one_request(http, convs[i % len(convs)], max_tokens), "prompt": i % len(convs)}

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"concurrency": c, **summary(results, wall, paired)}


def load_sync(*args: Any) -> dict[str, Any]:
    return asyncio.run(load(*args))


def run_load(url: str, convs: list, args: argparse.Namespace, paired: int = 0) -> dict[str, Any]:
    """The load, from a client process of its own unless --client-in-process."""
    job = (url, convs, args.requests, args.concurrency, args.max_tokens, paired)
    if args.client_in_process:
        return load_sync(*job)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(load_sync, *job).result()


def inprocess(engine: Any, convs: list, max_tokens: int, icfg: Any) -> dict[str, Any]:
    """Medians of the in-process speeds of `convs`, each timed as the served requests are: the engine's own timer
    (prefill included) and after the first text."""
    engine.chat(convs[0], max_tokens=max_tokens, infer=icfg)  # warm-up, not counted (the served run has one too)
    engine_speeds, decode_speeds = [], []
    for messages in convs:
        stream = engine.stream(messages, max_tokens=max_tokens, infer=icfg)
        t0, first = time.perf_counter(), None
        for delta in stream:
            if first is None and delta:
                first = time.perf_counter() - t0
        done = time.perf_counter() - t0
        engine_speeds.append(stream.result.tokens_per_s)
        decode_speeds.append(after_first(stream.result.completion_tokens, first, done))
    engine_median, decode_median = median(engine_speeds), median(decode_speeds)
    return {
        "inprocess_engine_tokens_per_s_median": engine_median,
        "inprocess_decode_tokens_per_s_median": decode_median,
    }


def serve_config(overrides: list[str]) -> dict[str, Any]:
    """conf/serve.yaml with `overrides`, resolved as serve.py resolves it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"paths.root_dir={ROOT}", *overrides])
    del cfg.paths.output_dir  # a Hydra runtime value: there is no Hydra run here
    return OmegaConf.to_container(cfg, resolve=True)


def served_row(cfg: dict[str, Any], convs: list, args: argparse.Namespace) -> dict[str, Any]:
    from dovetail_infer.serve import (
        ServerSettings,
        ServerThread,
        build_engine_on_thread,
        create_app,
        settings_from_config,
    )

    # as `python serve.py` runs: the engine is built, timed in-process and decodes on one thread of its own
    engine, icfg, torch_thread = build_engine_on_thread(cfg)
    paired = len(convs) if args.inprocess is None else min(args.inprocess, len(convs))
    settings = settings_from_config(cfg)
    settings = ServerSettings(**{**settings.__dict__, "queue_size": max(settings.queue_size, args.concurrency)})
    with torch_thread:
        local = torch_thread.submit(inprocess, engine, convs[:paired], args.max_tokens, icfg).result() if paired else {}
        with ServerThread(create_app(engine, icfg, settings, torch_thread)) as server:
            row = run_load(server.url, convs, args, paired)
    row.update(local)
    for served, alone in (("request", "engine"), ("engine", "engine"), ("decode", "decode")):
        a, b = row.get(f"paired_{served}_tokens_per_s_median"), local.get(f"inprocess_{alone}_tokens_per_s_median")
        row[f"{served}_vs_inprocess"] = round(a / b, 4) if a and b else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-bench", type=int, default=2, help="prompts per bench set (6 sets), used round-robin")
    ap.add_argument("--inprocess", type=int, help="the first N prompts also decoded in-process (default all; 0 = skip)")
    ap.add_argument("--url", help="load an already running server instead (one row)")
    ap.add_argument("--label", default="external")
    ap.add_argument("--client-in-process", action="store_true", help="run the load client in the server's process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load" / "serve_load"))
    ap.add_argument("overrides", nargs="*", help="serve.py overrides after --, e.g. -- infer=default target=...")
    args = ap.parse_args()
    convs = prompts(args.per_bench)
    rows: dict[str, Any] = {}
    if args.url:
        rows[args.label] = run_load(args.url, convs, args)
    else:
        cfg = serve_config(args.overrides)
        if cfg.get("ckpt"):
            rows["draft"] = served_row(cfg, convs, args)
        rows["target-only"] = served_row({**cfg, "ckpt": None}, convs, args)
    result = {"stamp": stamp(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    keys = ["errors", "latency_p50_s", "ttft_p50_s", "throughput_tokens_per_s", "tau_mean"]
    keys += [f"{k}_tokens_per_s_median" for k in SPEEDS]
    keys += ["inprocess_engine_tokens_per_s_median", "inprocess_decode_tokens_per_s_median"]
    keys += [f"{k}_vs_inprocess" for k in SPEEDS]
    lines = ["| row | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for name, r in rows.items()]
    table = "\n".join(lines)
    s = result["stamp"]
    header = f"{args.requests} requests at concurrency {args.concurrency}, max_tokens {args.max_tokens}"
    md = f"# serve_load\n\n{header}; {s['date']}, `{s['commit']}`, {s['cpu']}.\n\n{table}\n"
    out.with_suffix(".md").write_text(md)
    print(table)
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()

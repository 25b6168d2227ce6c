"""Load on the OpenAI-compatible server: N streamed chat requests at concurrency C, with and without the draft.

Per row: latency and time to first token (p50/p95, seconds, queue wait included), aggregate throughput (completion
tokens / wall time), the client-side decoding speed of each request (completion tokens / (latency - queue wait)),
τ and errors. Unless `--url` is given, the script serves each row itself (`conf/serve.yaml` plus the overrides after
`--`, as `python serve.py` would) on a free localhost port, and first decodes the same prompts in-process
(`Dovetail.chat`), so `server_overhead` compares the served speed with the engine's own.

    python benchmarks/serve_load.py --requests 100 --concurrency 8 --max-tokens 64
    python benchmarks/serve_load.py --requests 4 --concurrency 2 --max-tokens 8 -- target=tiny_random ckpt=null
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --label remote   # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, stamp

from dovetail_infer.bench import conversation, load_bench

BENCHES = ("mt_bench", "humaneval", "gsm8k", "alpaca", "sum", "qa")


def prompts(per_bench: int) -> list[list[dict[str, str]]]:
    root = ROOT / "data" / "bench"
    return [conversation(q, [], 0) for name in BENCHES for q in load_bench(name, root, None, per_bench)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 4)


async def one_request(http: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat request: latency, TTFT, tokens, the server's stats, or the error."""
    body = {"model": "dovetail", "messages": messages, "max_tokens": max_tokens, "stream": True}
    body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"error": None, "ttft": None, "tokens": 0, "stats": None}
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
                out["stats"] = chunk.get("dovetail") or out["stats"]
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out["error"] = type(e).__name__
    out["latency"] = time.perf_counter() - t0
    return out


async def load(url: str, convs: list[list[dict[str, str]]], n: int, c: int, max_tokens: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(c)
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        await one_request(http, convs[0], max_tokens)  # warm-up, not counted

        async def run(i: int) -> dict[str, Any]:
            async with sem:
                return await one_request(http, convs[i % len(convs)], max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    errors: dict[str, int] = {}
    for r in results:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    speeds = [
        r["tokens"] / (r["latency"] - r["stats"]["queue_s"])
        for r in ok
        if r["stats"] and r["latency"] > r["stats"]["queue_s"]
    ]
    taus = [r["stats"]["tau"] for r in ok if r["stats"] and r["stats"]["forwards"]]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": n,
        "concurrency": c,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": round(wall, 3),
        "latency_p50_s": pct(lat, 0.5),
        "latency_p95_s": pct(lat, 0.95),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall > 0 else None,
        "request_tokens_per_s_median": round(statistics.median(speeds), 2) if speeds else None,
        "tau_mean": round(statistics.mean(taus), 3) if taus else None,
        "completion_tokens": sum(r["tokens"] for r in ok),
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
    from dovetail_infer.chat import build_engine
    from dovetail_infer.serve import ServerSettings, ServerThread, create_app, settings_from_config

    engine, icfg = build_engine(cfg)
    local = [engine.chat(m, max_tokens=args.max_tokens, infer=icfg) for m in convs[: args.inprocess]]
    settings = settings_from_config(cfg)
    settings = ServerSettings(**{**settings.__dict__, "queue_size": max(settings.queue_size, args.concurrency)})
    with ServerThread(create_app(engine, icfg, settings)) as server:
        row = asyncio.run(load(server.url, convs, args.requests, args.concurrency, args.max_tokens))
    if local:
        inproc = statistics.median(r.tokens_per_s for r in local)
        row["inprocess_tokens_per_s_median"] = round(inproc, 2)
        served = row["request_tokens_per_s_median"]
        row["server_overhead"] = round(1 - served / inproc, 4) if served and inproc else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-bench", type=int, default=2, help="prompts per bench set (6 sets), used round-robin")
    ap.add_argument("--inprocess", type=int, default=6, help="prompts also decoded in-process first (0 = skip)")
    ap.add_argument("--url", help="load an already running server instead (one row)")
    ap.add_argument("--label", default="external")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load" / "serve_load"))
    ap.add_argument("overrides", nargs="*", help="serve.py overrides after --, e.g. -- infer=default target=...")
    args = ap.parse_args()
    convs = prompts(args.per_bench)
    rows: dict[str, Any] = {}
    if args.url:
        rows[args.label] = asyncio.run(load(args.url, convs, args.requests, args.concurrency, args.max_tokens))
    else:
        cfg = serve_config(args.overrides)
        if cfg.get("ckpt"):
            rows["draft"] = served_row(cfg, convs, args)
        rows["target-only"] = served_row({**cfg, "ckpt": None}, convs, args)
    result = {"stamp": stamp(), "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    keys = ["errors", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "throughput_tokens_per_s"]
    keys += ["request_tokens_per_s_median", "inprocess_tokens_per_s_median", "server_overhead", "tau_mean"]
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

"""Nothing lost, nothing trusted blindly: crash-resume, hostile files, mismatches and bad input end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, target_spec
from helpers.prep import prep_inputs
from helpers.train import TINY, metrics_rows, run_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dovetail_infer.checkpoint import DraftMismatchError, load_draft, save_draft
from dovetail_infer.models.draft import DraftConfig, DraftModel

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- crash-resume of training -------------------------------------------------------------------------------
RESUME = [
    "target=tiny_random",
    "data=default",
    "compile=false",
    "draft.depth=1",
    "data.limit=32",
    "data.max_new_tokens=16",
    "data.regen_batch_size=16",
    "data.batch_size=2",
    "data.val_max_rows=2",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.max_epochs=-1",
    "trainer.max_time=null",
    "trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.model_checkpoint.save_top_k=-1",
    "num_threads=1",
]
STEPS = 20  # 29 train examples / batch 2 = 15 batches per epoch: the run crosses one epoch boundary


def _losses(run_dir: Path, version: int | None = None) -> dict[int, float]:
    rows = metrics_rows(run_dir) if version is None else []
    if version is not None:
        import csv

        with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _ckpt_steps(run_dir: Path) -> list[int]:
    return [int(p.stem.rsplit("step", 1)[1]) for p in (run_dir / "checkpoints").glob("epoch*-step*.ckpt")]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_same_step_order_and_loss(tmp_path):
    """Uninterrupted N steps vs. SIGKILL after step k + `ckpt_path=last`: the same steps and the same losses."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run_train(*RESUME, f"trainer.max_steps={STEPS}", f"hydra.run.dir={full}")
    reference = _losses(full)
    assert sorted(reference) == list(range(STEPS))

    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", *RESUME, f"trainer.max_steps={STEPS}", f"hydra.run.dir={crashed}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (crashed / "checkpoints").is_dir() and any(s >= 3 for s in _ckpt_steps(crashed)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(60) == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-3000:]}"
    proc.stderr.close()
    resumed_at = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    # last.ckpt is written (atomically) just after the step's own file: it holds step k or k - 1
    assert 2 <= resumed_at < STEPS and resumed_at % 15 != 0, resumed_at  # killed mid-epoch

    run_train(*RESUME, f"trainer.max_steps={STEPS}", f"hydra.run.dir={crashed}", "ckpt_path=last")
    after = _losses(crashed, version=1)  # the resumed process logs into a new CSV version
    assert sorted(after) == list(range(resumed_at, STEPS))  # continues at the checkpoint's global step
    got = torch.tensor([after[s] for s in sorted(after)])
    want = torch.tensor([reference[s] for s in sorted(after)])
    # same weights, optimizer, LR schedule, batches and noise: float32 on one thread reproduces the losses
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    meta = json.loads((crashed / "draft" / "dovetail.json").read_text())
    assert meta["summary"]["global_step"] == STEPS


def _kill_at_step(cmd: list[str], run_dir: Path, min_step: int) -> None:
    """Start `cmd`, SIGKILL it once a checkpoint of step >= min_step exists."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / "checkpoints").is_dir() and any(s >= min_step for s in _ckpt_steps(run_dir)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(60) == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-3000:]}"
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_in_second_epoch_of_epoch_based_run_ends_bitwise_equal(tmp_path):
    """The default, epoch-based setup: killed mid-way through epoch 2, resumed, the exported draft is bitwise the
    uninterrupted run's (before the fix the resumed run retrained epoch 2's first batches and skipped others)."""
    from safetensors.torch import load_file

    epochs = [*[o for o in RESUME if not o.startswith("trainer.max_epochs")], "trainer.max_epochs=2"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run_train(*epochs, f"hydra.run.dir={full}")
    _kill_at_step([sys.executable, "train.py", *TINY, *epochs, f"hydra.run.dir={crashed}"], crashed, 15 + 4)
    resumed_at = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 15 < resumed_at < 30 and resumed_at % 15 != 0, resumed_at  # mid-way through the second epoch
    run_train(*epochs, f"hydra.run.dir={crashed}", "ckpt_path=last")
    after = _losses(crashed, version=1)
    assert sorted(after) == list(range(resumed_at, 30))
    a = load_file(full / "draft" / "model.safetensors")
    b = load_file(crashed / "draft" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumable_loader_skips_consumed_batches():
    """The loader's state says which batch comes next; a new loader given it yields the rest of that epoch."""
    from dovetail_train.data.datamodule import ResumableLoader, ResumableSampler

    data = list(range(10))

    def loader() -> ResumableLoader:
        return ResumableLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=5))

    a = loader()
    a.sampler.set_epoch(1)
    it = iter(a)
    seen = [next(it).tolist(), next(it).tolist()]
    state = a.state_dict()
    assert state == {"epoch": 1, "batches": 2, "batch_size": 3}
    rest = [b.tolist() for b in it]
    b = loader()
    b.load_state_dict(state)
    b.sampler.set_epoch(1)
    assert [x.tolist() for x in b] == rest and sorted(sum(seen + rest, [])) == data
    assert [x.tolist() for x in b] == seen + rest  # the skip applies once: the next pass is a whole epoch
    b.sampler.set_epoch(2)
    assert [x.tolist() for x in b] != seen + rest  # a new epoch, a new order
    with pytest.raises(ValueError, match="batch_size=3"):
        ResumableLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=5)).load_state_dict(state)


@pytest.mark.slow
def test_ckpt_with_pickle_payload_is_refused(tmp_path):
    """`ckpt_path=<file>` is read with weights_only=True: a crafted pickle fails and its code never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, evil)
    proc = run_train(
        *RESUME, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={evil}", check=False
    )
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr or "weights_only" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


# ---- long preparation work: a real SIGKILL mid-way, then resume ------------------------------------------
PREP_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import target_spec
from dovetail_infer.models.target import load_target
from dovetail_train.data import features as F, regenerate as R
from helpers.prep import prep_inputs

target = load_target(target_spec("tiny_random"))
convs, examples = prep_inputs()
if {kind!r} == "regenerate":
    real = R.greedy_static
    R.greedy_static = lambda *a: (time.sleep(0.3), real(*a))[1]  # slow enough to be killed mid-way
    R.regenerate(target, convs, {out!r}, max_new_tokens=8, batch_size=1, progress=False)
else:
    real = F.compute_features
    F.compute_features = lambda *a: (time.sleep(0.3), real(*a))[1]
    F.build_feature_cache(
        target, examples, {out!r}, key={{}}, shard_rows=2, batch_tokens=16, progress=False, compile=False
    )
print("finished")
"""


def _kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-way (rc {proc.returncode}): {out}{err[-3000:]}"


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("kind", ["regenerate", "features"])
def test_sigkill_mid_preparation_resumes_without_redoing(kind, tiny_target, tmp_path, monkeypatch):
    from dovetail_train.data import features as F
    from dovetail_train.data import regenerate as R

    out = tmp_path / "cache"
    script = PREP_SCRIPT.format(tests=str(ROOT / "tests"), kind=kind, out=str(out))
    convs, examples = prep_inputs()
    if kind == "regenerate":
        ready = lambda: any(_lines(p) >= 3 for p in out.glob("regen-*/part.jsonl"))  # noqa: E731
    else:

        def ready() -> bool:
            m = next(out.glob("features-*/manifest.json"), None)
            return m is not None and len(json.loads(m.read_text())["shards"]) >= 2

    _kill_when([sys.executable, "-c", script], ready)

    calls = {"rows": 0}
    if kind == "regenerate":
        part = next(out.glob("regen-*/part.jsonl"))
        done_before = len(R.read_part(part))
        assert 3 <= done_before < len(convs)
        real = R.greedy_static

        def counted(target, prompts, n):
            calls["rows"] += len(prompts)
            return real(target, prompts, n)

        monkeypatch.setattr(R, "greedy_static", counted)
        resumed = R.regenerate(tiny_target, convs, out, max_new_tokens=8, batch_size=1, progress=False)
        assert calls["rows"] == len(convs) - done_before  # finished replies are not decoded again
        fresh = R.regenerate(tiny_target, convs, tmp_path / "fresh", max_new_tokens=8, batch_size=1, progress=False)
        assert resumed == fresh
    else:
        folder = next(out.glob("features-*"))
        done_before = json.loads((folder / "manifest.json").read_text())["shards"]
        assert 2 <= len(done_before) < 4
        real = F.compute_features

        def counted(target, ids):
            calls["rows"] += ids.shape[0]
            return real(target, ids)

        monkeypatch.setattr(F, "compute_features", counted)
        kw = {"key": {}, "shard_rows": 2, "batch_tokens": 16, "progress": False, "compile": False}
        cache = F.build_feature_cache(tiny_target, examples, out, **kw)
        assert calls["rows"] == len(examples) - 2 * len(done_before)  # finished shards are not recomputed
        assert not list(folder.glob("*.tmp"))  # the shard being written when killed is cleaned up
        fresh = F.build_feature_cache(tiny_target, examples, tmp_path / "fresh", **kw)
        for i in range(len(examples)):
            assert torch.equal(cache[i]["hidden"], fresh[i]["hidden"])


# ---- hostile draft dirs --------------------------------------------------------------------------------------
@pytest.fixture
def draft_dir(tiny_target, tmp_path) -> Path:
    torch.manual_seed(0)
    return save_draft(
        DraftModel(DraftConfig.from_target(tiny_target.config, depth=1)), tmp_path / "d", tiny_target.identity()
    )


def test_weights_symlink_is_refused(tiny_target, draft_dir, tmp_path):
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(draft_dir / "model.safetensors", real)
    (draft_dir / "model.safetensors").symlink_to(real)
    with pytest.raises(ValueError, match="model.safetensors must be a regular file"):
        load_draft(draft_dir, tiny_target.identity())


@pytest.mark.parametrize("fmt", ["torch_zip", "numpy", "empty", "truncated"])
def test_weights_in_another_format_are_refused(tiny_target, draft_dir, tmp_path, fmt):
    weights = draft_dir / "model.safetensors"
    if fmt == "torch_zip":  # a torch.save archive renamed: never unpickled
        torch.save(DraftModel(DraftConfig.from_target(tiny_target.config, depth=1)).state_dict(), weights)
    elif fmt == "numpy":
        import numpy as np

        np.save(tmp_path / "w.npy", np.zeros(8))
        shutil.copy(tmp_path / "w.npy", weights)
    elif fmt == "empty":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_draft(draft_dir, tiny_target.identity())


def test_config_with_unknown_keys_names_file_and_key(tiny_target, draft_dir):
    conf = json.loads((draft_dir / "config.json").read_text())
    (draft_dir / "config.json").write_text(json.dumps({**conf, "__class__": "os.system", "deep": 3}))
    with pytest.raises(ValueError, match=r"config.json: not a valid draft config.*unknown DraftConfig keys.*'deep'"):
        load_draft(draft_dir, tiny_target.identity())
    (draft_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a valid draft config"):
        load_draft(draft_dir, tiny_target.identity())


def test_missing_dovetail_json_is_refused(tiny_target, draft_dir):
    from dovetail_infer.engine import Dovetail

    (draft_dir / "dovetail.json").unlink()
    with pytest.raises(FileNotFoundError, match="dovetail.json is missing"):
        load_draft(draft_dir, tiny_target.identity())
    with pytest.raises(FileNotFoundError, match="dovetail.json is missing"):
        Dovetail.from_pretrained(draft_dir, tiny_target, draft_device="cpu")


@pytest.mark.parametrize("meta", [{}, {"target": {}}, {"target": {"name": "x"}}, {"target": "smollm2"}, "[1, 2"])
def test_partial_dovetail_json_is_refused(tiny_target, draft_dir, meta):
    """An empty or partial dovetail.json would skip every identity check: refused, naming the file."""
    path = draft_dir / "dovetail.json"
    path.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    with pytest.raises(ValueError, match="dovetail.json"):
        load_draft(draft_dir, tiny_target.identity())


def test_non_finite_draft_is_never_saved_nor_loaded(tiny_target, draft_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    draft = DraftModel(DraftConfig.from_target(tiny_target.config, depth=1))
    with torch.no_grad():
        draft.fusion.w1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*fusion.w1.weight"):
        save_draft(draft, tmp_path / "nan_draft", tiny_target.identity())
    assert not (tmp_path / "nan_draft" / "model.safetensors").exists()
    sd = load_file(draft_dir / "model.safetensors")
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("inf"))
    save_file(sd, draft_dir / "model.safetensors")
    with pytest.raises(ValueError, match=rf"non-finite.*{key}"):
        load_draft(draft_dir, tiny_target.identity())


@pytest.mark.slow
def test_nan_loss_stops_training_naming_step_and_part(tmp_path):
    proc = run_train("loss.w_feat=nan", "debug=fdr", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "non-finite train loss at global step 0" in proc.stderr and "w_feat * feat_loss" in proc.stderr
    assert not (tmp_path / "draft" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=sharegpt"], "data.path is required for data=sharegpt"),
        (["data.max_length=-5"], "data.max_length must be a positive integer, got -5"),
        (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
        (["draft.intermediate_size=0"], "draft intermediate_size must be a positive integer, got 0"),
        (["loss.unroll=0"], "loss.unroll must be >= 1"),
    ],
)
def test_bad_training_settings_fail_naming_the_key(tmp_path, overrides, expected):
    proc = run_train(*overrides, "debug=fdr", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_unwritable_run_dir_names_the_dir(tmp_path):
    """As root chmod does not stop writes: a run dir below a regular file cannot be created. Hydra creates the dir
    itself (its error names it); a dir that exists but refuses the log file gets the run log handler's message."""
    from dovetail_infer.outdir import RunLogHandler

    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_train("debug=fdr", f"hydra.run.dir={blocker / 'run'}", check=False)
    assert proc.returncode != 0 and str(blocker / "run") in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(SystemExit, match=rf"output dir {blocker / 'run'} is not writable"):
        RunLogHandler(str(blocker / "run" / "train.log"))


@pytest.mark.slow
def test_rerun_into_a_finished_run_dir_is_refused(tmp_path):
    """Without ckpt_path a second run would replace draft/ and mix its checkpoints with the first run's."""
    run_train("debug=fdr", f"hydra.run.dir={tmp_path}")
    before = (tmp_path / "draft" / "model.safetensors").read_bytes()
    proc = run_train("debug=fdr", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "already holds a training run" in proc.stderr and "ckpt_path=last" in proc.stderr
    assert (tmp_path / "draft" / "model.safetensors").read_bytes() == before


def test_an_over_long_prompt_is_skipped_not_regenerated(tiny_target, tmp_path):
    from dovetail_train.data.conversations import Conversation
    from dovetail_train.data.regenerate import regenerate

    convs = [
        Conversation("short", [{"role": "user", "content": "Say hi"}]),
        Conversation("huge", [{"role": "user", "content": "word " * 20_000}]),
        Conversation("short2", [{"role": "user", "content": "Count to three"}]),
    ]
    out = regenerate(tiny_target, convs, tmp_path, max_new_tokens=4, batch_size=2, progress=False, max_prompt_tokens=64)
    assert [c.id for c in out] == ["short", "short2"]


# ---- mismatches: one message naming both sides, before any decoding ------------------------------------------
def _identity(tiny_target, **changes) -> dict:
    return {**tiny_target.identity(), **changes}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source_id": "random-0000", "name": "other"}, r"source_id: draft 'random-\w+' vs target 'random-0000'"),
        ({"template_hash": "feedbeef"}, r"template_hash: draft '\w+' vs target 'feedbeef'"),  # tokenizer or template
        ({"vocab_size": 32000}, "vocab_size: draft 49152 vs target 32000"),
        ({"hidden_size": 96}, "hidden_size: draft 64 vs target 96"),
        ({"n_layers": 30}, "n_layers: draft 2 vs target 30"),
    ],
)
def test_mismatch_names_both_sides(tiny_target, draft_dir, changes, expected):
    with pytest.raises(DraftMismatchError, match=expected) as err:
        load_draft(draft_dir, _identity(tiny_target, **changes))
    assert "trained for target 'tiny_random'" in str(err.value) and str(draft_dir) in str(err.value)


def test_depth_mismatch_between_config_and_weights(tiny_target, draft_dir):
    conf = json.loads((draft_dir / "config.json").read_text())
    (draft_dir / "config.json").write_text(json.dumps({**conf, "depth": 3}))
    with pytest.raises(DraftMismatchError, match=r"does not match its config.json \(depth 3.*missing"):
        load_draft(draft_dir, tiny_target.identity())


@pytest.fixture(scope="module")
def other_targets() -> dict:
    from dovetail_infer.models.target import load_target

    return {
        "weights": load_target(target_spec("tiny_random", seed=1)),  # same sizes and tokenizer, other weights
        "template": load_target(
            target_spec("tiny_random", chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
        ),
    }


@pytest.mark.parametrize(("kind", "expected"), [("weights", "source_id"), ("template", "template_hash")])
def test_from_pretrained_and_evaluate_refuse_before_decoding(
    draft_dir, other_targets, tmp_path, monkeypatch, kind, expected
):
    from dovetail_infer import evaluate as E
    from dovetail_infer.engine import Dovetail

    target = other_targets[kind]
    with pytest.raises(DraftMismatchError, match=expected):
        Dovetail.from_pretrained(draft_dir, target, draft_device="cpu")

    def no_decoding(*a, **k):
        raise AssertionError("decoding started")

    monkeypatch.setattr(Dovetail, "generate", no_decoding)
    monkeypatch.setattr(Dovetail, "generate_baseline", no_decoding)
    bench = tmp_path / "q.jsonl"
    bench.write_text(json.dumps({"question_id": 1, "turns": ["Hi"]}) + "\n")
    cfg = {"ckpt": str(draft_dir), "infer": {"budgets": [2], "depth": 2, "top_k": 2, "progress": False},
           "bench": {"name": "custom", "path": str(bench)}, "target": target_spec("tiny_random")}  # fmt: skip
    with pytest.raises(DraftMismatchError, match=expected):
        E.evaluate(cfg, tmp_path / "out", target=target)
    assert not list((tmp_path / "out" / "answers").glob("*.jsonl"))


# ---- bad input: the evaluate config, output dirs, Hydra keys, raw JSONL --------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    """evaluate() must fail before it loads a target (the slow part)."""
    from dovetail_infer import evaluate as E

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(E, "load_eval_target", refuse)
    monkeypatch.setattr(E, "load_target", refuse)


def _eval_cfg(draft_dir: Path, **infer) -> dict:
    return {"ckpt": str(draft_dir), "target": target_spec("tiny_random"), "bench": {"name": "custom", "path": "x"},
            "infer": {"budgets": [2], "progress": False, **infer}}  # fmt: skip


@pytest.mark.parametrize(
    ("infer", "expected"),
    [
        ({"budgets": [4, 0]}, "InferConfig.budget must be an integer >= 1, got 0"),
        ({"budgets": None, "budget": -3}, "InferConfig.budget must be an integer >= 1, got -3"),
        ({"depth": 0}, "InferConfig.depth must be an integer >= 1, got 0"),
        ({"top_k": -1}, "InferConfig.top_k must be an integer >= 1, got -1"),
        ({"max_new_tokens": 0}, "InferConfig.max_new_tokens must be an integer >= 1"),
        ({"budegt": 4}, r"unknown infer keys \['budegt'\]"),
        ({"lookup": -1}, "InferConfig.lookup must be an integer >= 0"),
        ({"compile": "fastest"}, "infer.compile must be false, true or one of"),
        ({"draft_quant": "int3"}, "draft_quant must be null or one of \\['int4', 'int4a8', 'int8'\\], got 'int3'"),
    ],
)
def test_evaluate_config_errors_before_loading(draft_dir, tmp_path, no_model_loading, infer, expected):
    from dovetail_infer.evaluate import evaluate

    with pytest.raises(ValueError, match=expected):
        evaluate(_eval_cfg(draft_dir, **infer), tmp_path / "out")


def test_unwritable_output_dir_fails_first(draft_dir, tmp_path, no_model_loading):
    """Tests run as root, so chmod does not stop writes: a dir below a regular file cannot be created."""
    from dovetail_infer.evaluate import evaluate
    from dovetail_train.pipeline import check_output_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"output dir .*a_file/out is not writable"):
        evaluate(_eval_cfg(draft_dir), blocker / "out")
    with pytest.raises(OSError, match="a_file/run is not writable"):
        check_output_dir(blocker / "run")


def test_full_disk_fails_first(draft_dir, tmp_path, monkeypatch, no_model_loading):
    from dovetail_infer import outdir
    from dovetail_infer.evaluate import evaluate
    from dovetail_train.pipeline import check_output_dir

    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5 << 20))
    with pytest.raises(OSError, match=r"only 5 MiB free at .*out; Dovetail needs at least 200 MiB"):
        evaluate(_eval_cfg(draft_dir), tmp_path / "out")
    with pytest.raises(OSError, match="only 5 MiB free"):
        check_output_dir(tmp_path / "run")


def test_evaluate_entry_names_an_unknown_key(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "evaluate.py", "ckpt=x", "target=tiny_random", "infer.budegt=4", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "infer.budegt" in proc.stderr, proc.stderr[-2000:]


LINES = st.one_of(
    st.text(max_size=30),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
    st.just('{"conversations": [{"from": "human", "value": "hi"}]}'),
    st.just('{"conversations": [{"from": "gpt", "value": "only"}]}'),
    st.just('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINES.filter(lambda s: "\n" not in s and "\r" not in s), min_size=1, max_size=10))
def test_fuzz_jsonl_files(tmp_path, lines):
    """Any JSONL file: rows kept or skipped by a known reason at their 1-based line, or one error naming the file."""
    from dovetail_train.data.conversations import REASONS, load_conversations

    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        convs, report = load_conversations(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert report.total == sum(1 for line in lines if line.strip()) == len(convs) + report.skipped
    assert set(report.counts) <= set(REASONS)
    for where in (w for ws in report.examples.values() for w in ws):  # 1-based line numbers of skipped rows
        n = int(where.removeprefix("line "))
        assert lines[n - 1].strip()
        if where in report.examples.get("invalid_json", []):
            with pytest.raises(json.JSONDecodeError):
                json.loads(lines[n - 1])
    for c in convs:
        roles = [m["role"] for m in c.messages]
        assert "user" in roles and "system" not in roles[1:] and roles[0] != "assistant"


# ---- fuzzing the grown tree's mask (test_tree.py checks tree_mask on arbitrary parent lists) -----------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 5), st.integers(1, 4), st.integers(0, 10_000))
def test_fuzz_grown_tree_mask_is_exactly_ancestors(budget, depth, k, seed):
    from dovetail_infer.tree import grow_tree

    gen = torch.Generator().manual_seed(seed)

    def expand(parent_rows, tokens, d):
        return torch.log_softmax(torch.randn(len(tokens), 12, generator=gen) * 3, -1)

    tree, _ = grow_tree(0, torch.log_softmax(torch.randn(12, generator=gen), -1), expand, budget, depth, k)
    mask = tree.mask()
    for i in range(len(tree.tokens)):
        seen, j = {i}, i
        while tree.parents[j] >= 0:
            j = tree.parents[j]
            seen.add(j)
        assert set(mask[i].nonzero().flatten().tolist()) == seen  # ancestors and itself, nothing else
        assert tree.depths[i] == len(seen) - 1 and (i == 0 or tree.parents[i] < i)

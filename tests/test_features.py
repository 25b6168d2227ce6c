"""Offline feature cache: correctness, reuse, invalidation, resume after a crash, corruption detection."""

from __future__ import annotations

import json

import pytest
import torch

from dovetail_train.data import features as F
from dovetail_train.data.features import FeatureCache, FeatureCacheError, build_feature_cache, compute_features


def make_examples(n: int = 10, seed: int = 0, vocab: int = 49152) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(0, vocab, (T,), generator=g).tolist()
        mask = (torch.rand(T, generator=g) > 0.5).long().tolist()
        out.append({"input_ids": ids, "loss_mask": mask})
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch):
    """Counts target forwards made by the cache builder (and can crash after a number of them)."""
    state = {"n": 0, "crash_after": None}
    real = F.compute_features

    def counted(target, ids):
        if state["crash_after"] is not None and state["n"] >= state["crash_after"]:
            raise RuntimeError("simulated crash")
        state["n"] += 1
        return real(target, ids)

    monkeypatch.setattr(F, "compute_features", counted)
    return state


def build(target, examples, root, **kw):
    # eager: the `calls` fixture counts compute_features; the compiled path has its own test
    kw = {"key": {"max_length": 64}, "shard_rows": 4, "batch_tokens": 64, "progress": False, "compile": False, **kw}
    return build_feature_cache(target, examples, root, **kw)


def test_compiled_extraction_matches_the_eager_forward(tiny_target, tmp_path):
    """compile=True extracts through one compiled block over plain linears sharing the target's weights: the same
    features up to rounding, padded rows included, with no target forward through compute_features."""
    forward = F.feature_forward(tiny_target, compile=True)
    blocks = F._plain_blocks(tiny_target.model)
    assert blocks is not None
    w = tiny_target.model.layers[0].self_attn.qkv_proj.weight
    assert blocks[0].self_attn.qkv_proj.weight.data_ptr() == w.data_ptr()  # shared, not copied
    examples = make_examples(7, seed=3)
    eager = build(tiny_target, examples, tmp_path / "eager")
    compiled = build(tiny_target, examples, tmp_path / "compiled", compile=True)
    assert compiled.path.name == eager.path.name  # the same cache key: both are the target's features
    for i in range(len(examples)):
        torch.testing.assert_close(compiled[i]["hidden"].float(), eager[i]["hidden"].float(), rtol=2e-2, atol=3e-2)
    ids = torch.randint(0, tiny_target.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(forward(ids).float(), compute_features(tiny_target, ids).float(), rtol=2e-2, atol=3e-2)


def test_a_failed_compile_falls_back_to_eager(tiny_target, monkeypatch, caplog):
    """A compile that fails on the first call (a machine without a C++ compiler) warns and extracts eagerly."""

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(F.torch, "compile", broken)
    forward = F.feature_forward(tiny_target, compile=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with caplog.at_level("WARNING"):
        out = forward(ids)
    assert out.equal(compute_features(tiny_target, ids)) and "extracting eagerly" in caplog.text
    assert forward(ids).equal(out)


def test_quantized_targets_extract_eagerly(tiny_target):
    """A layer holding a module the compiled path does not know (a quantized linear) keeps the eager forward."""
    from dovetail_infer.models.linear import QuantLinear

    model = tiny_target.model
    old = model.layers[0].mlp.down_proj
    ids = torch.tensor([[1, 2, 3]])
    try:
        model.layers[0].mlp.down_proj = QuantLinear.__new__(QuantLinear)
        torch.nn.Module.__init__(model.layers[0].mlp.down_proj)
        assert F._plain_blocks(model) is None
    finally:
        model.layers[0].mlp.down_proj = old
    assert F._plain_blocks(model) is not None
    assert F.feature_forward(tiny_target, compile=False)(ids).equal(compute_features(tiny_target, ids))


def test_cached_hidden_matches_target(tiny_target, tmp_path, calls):
    examples = make_examples(10)
    cache = build(tiny_target, examples, tmp_path)
    assert len(cache) == 10 and len(list(cache.path.glob("shard-*.arrow"))) == 3
    for i, ex in enumerate(examples):
        row = cache[i]
        ref = tiny_target.hidden_states(torch.tensor([ex["input_ids"]]))[0]
        assert row["hidden"].dtype == torch.bfloat16 and row["hidden"].shape == ref.shape
        assert row["input_ids"].tolist() == ex["input_ids"] and row["loss_mask"].tolist() == ex["loss_mask"]
        torch.testing.assert_close(row["hidden"].float(), ref.float(), rtol=1e-2, atol=2e-2)
    assert cache.bytes_per_token >= 2 * tiny_target.config.hidden_size
    assert cache[-1]["input_ids"].tolist() == examples[-1]["input_ids"]


def test_compute_features_online(tiny_target):
    ids = torch.tensor(make_examples(1)[0]["input_ids"])[None]
    torch.testing.assert_close(compute_features(tiny_target, ids), tiny_target.hidden_states(ids))


def test_reuse_and_invalidation(tiny_target, tmp_path, calls):
    examples = make_examples(6)
    first = build(tiny_target, examples, tmp_path)
    n = calls["n"]
    assert n > 0
    again = build(tiny_target, examples, tmp_path)
    assert calls["n"] == n and again.path == first.path  # reused: no target forward
    assert FeatureCache.open(first.path)[2]["input_ids"].tolist() == examples[2]["input_ids"]
    paths = {first.path}
    paths.add(build(tiny_target, examples, tmp_path, key={"max_length": 32}).path)
    changed = [dict(e) for e in examples]
    changed[0]["loss_mask"] = [1 - m for m in changed[0]["loss_mask"]]
    paths.add(build(tiny_target, changed, tmp_path).path)
    paths.add(build(tiny_target, examples, tmp_path, storage_dtype="float16").path)
    assert len(paths) == 4


def test_new_target_changes_key(tiny_target, tmp_path):
    from dovetail_infer.models.target import load_target
    from tests.conftest import target_spec

    other = load_target(target_spec("tiny_random", seed=1))
    ex = make_examples(2)
    assert build(tiny_target, ex, tmp_path).path != build(other, ex, tmp_path).path


def test_resume_after_crash(tiny_target, tmp_path, calls):
    examples = make_examples(12)
    lengths = [len(e["input_ids"]) for e in examples]
    shard0 = len(F._batches(lengths[:4], 40))
    calls["crash_after"] = shard0 + 1  # shard 0 finishes; shard 1 crashes after its first batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tiny_target, examples, tmp_path, batch_tokens=40)
    folder = next(tmp_path.glob("features-*"))
    done = json.loads((folder / "manifest.json").read_text())["shards"]
    assert list(done) == ["shard-00000.arrow"]
    calls.update(n=0, crash_after=None)
    cache = build(tiny_target, examples, tmp_path, batch_tokens=40)
    built = calls["n"]
    calls["n"] = 0
    full = build(tiny_target, examples, tmp_path / "fresh", batch_tokens=40)
    assert 0 < built < calls["n"]  # only shards 1 and 2 were redone
    assert not list(folder.glob("*.tmp"))
    for i in range(len(examples)):
        assert torch.equal(cache[i]["hidden"], full[i]["hidden"])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_detected(tiny_target, tmp_path, calls, damage):
    examples = make_examples(8)
    cache = build(tiny_target, examples, tmp_path)
    good = cache[5]["hidden"].clone()
    shard = cache.path / "shard-00001.arrow"
    del cache
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-200] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    with pytest.raises(FeatureCacheError, match="shard-00001.arrow"):
        FeatureCache.open(shard.parent)
    if damage == "truncate":  # sizes are checked even without checksums
        with pytest.raises(FeatureCacheError, match="size"):
            FeatureCache.open(shard.parent, verify=False)
    calls["n"] = 0
    rebuilt = build(tiny_target, examples, tmp_path)
    assert calls["n"] > 0  # only the damaged shard was redone
    assert torch.equal(rebuilt[5]["hidden"], good)
    FeatureCache.open(rebuilt.path)


def test_a_disk_too_small_for_the_cache_is_refused_up_front(tiny_target, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from dovetail_train.data.features import build_feature_cache

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 10))
    examples = [{"input_ids": list(range(1, 40)), "loss_mask": [0] * 10 + [1] * 29}]
    with pytest.raises(OSError, match=r"the feature cache \(39 tokens\) needs .* are free"):
        build_feature_cache(tiny_target, examples, tmp_path, key={}, progress=False)
    assert not list(tmp_path.rglob("*.arrow"))


def test_a_second_builder_waits_for_the_first(tmp_path):
    """The cache lock: a second holder blocks until the first lets go."""
    import threading
    import time

    from dovetail_infer.outdir import file_lock

    order = []

    def second():
        with file_lock(tmp_path / ".lock"):
            order.append("second")

    with file_lock(tmp_path / ".lock"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]

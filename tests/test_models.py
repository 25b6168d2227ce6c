"""The Llama implementation against HF, DGF against a hand computation, draft shapes, export/reload."""

from __future__ import annotations

import json

import pytest
import torch

from dovetail_infer.checkpoint import DraftMismatchError, load_draft, save_draft
from dovetail_infer.kv_cache import KVCache
from dovetail_infer.models.draft import DraftConfig, DraftModel
from dovetail_infer.models.fusion import DGFusion
from dovetail_infer.models.llama import Block


def test_hidden_states_and_logits_match_hf(tiny_target):
    ids = torch.tensor([tiny_target.apply_chat_template([{"role": "user", "content": "Name three rivers."}])])
    ours = tiny_target.hidden_states(ids)
    hf = tiny_target.hf_model()(ids, output_hidden_states=True)
    torch.testing.assert_close(ours, hf.hidden_states[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tiny_target.model.logits(ours), hf.logits, atol=1e-3, rtol=1e-3)


def test_cached_decoding_matches_full_forward(tiny_target):
    model = tiny_target.model
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = KVCache.for_model(model.config, 64)
    part = model(ids[:, :10], cache=cache, start=0)
    steps = [model(ids[:, i : i + 1], cache=cache, start=i) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat([part, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_commit_compacts_kept_slots():
    cache = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, max_len=8)
    k = torch.arange(16.0).view(1, 1, 8, 2)
    cache.update(0, 0, k, k.clone())
    cache.length = 3
    cache.commit([4, 6])
    assert cache.length == 5
    torch.testing.assert_close(cache.k[0][0, 0, 3:5], k[0, 0, [4, 6]])
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, 7, k[:, :, :2], k[:, :, :2])


def test_dgf_matches_hand_computation():
    torch.manual_seed(0)
    dim = 6
    fusion = DGFusion(dim)
    with torch.no_grad():
        fusion.emb_norm.weight.uniform_(0.5, 1.5)
    f, e = torch.randn(2, 3, dim), torch.randn(2, 3, dim)
    w1, w2, wz, g = fusion.w1.weight, fusion.w2.weight, fusion.wz.weight, fusion.emb_norm.weight
    e_n = e / torch.sqrt((e**2).mean(-1, keepdim=True) + 1e-5) * g
    h1 = f @ w1.T
    h2 = torch.nn.functional.silu(e_n @ w2.T)
    z = torch.sigmoid(torch.cat([h1, h2], -1) @ wz.T)
    expected = z * h1 + (1 - z) * h2
    torch.testing.assert_close(fusion(f, e), expected)
    assert all(m.bias is None for m in (fusion.w1, fusion.w2, fusion.wz))


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_draft_shapes_per_depth(tiny_target, depth):
    cfg = DraftConfig.from_target(tiny_target.config, depth=depth)
    draft = DraftModel(cfg)
    assert len(draft.layers) == depth
    assert isinstance(draft.layers[0].input_layernorm, torch.nn.Identity)
    assert all(not isinstance(b.input_layernorm, torch.nn.Identity) for b in draft.layers[1:])
    feat, emb = torch.randn(2, 7, cfg.hidden_size), torch.randn(2, 7, cfg.hidden_size)
    assert draft(feat, emb).shape == (2, 7, cfg.hidden_size)
    # each layer is one Llama block (the first without its input norm); DGF adds 4 D^2 + D
    block = sum(p.numel() for p in Block(cfg.layer_config()).parameters())
    d = cfg.hidden_size
    assert draft.num_trainable() == depth * block - d + (4 * d * d + d)


def test_draft_config_validation(tiny_target):
    with pytest.raises(ValueError, match="depth"):
        DraftConfig.from_target(tiny_target.config, depth=0)
    with pytest.raises(ValueError, match="fusion"):
        DraftConfig.from_target(tiny_target.config, fusion="sum")


@pytest.mark.parametrize("fusion", ["dgf", "concat"])
def test_export_reload_equality(tmp_path, tiny_target, fusion):
    cfg = DraftConfig.from_target(tiny_target.config, depth=2, fusion=fusion)
    draft = DraftModel(cfg)
    out = save_draft(draft, tmp_path / "draft", tiny_target.identity(), {"note": "test"})
    conf = json.loads((out / "config.json").read_text())
    assert conf["depth"] == 2 and conf["fusion"] == fusion
    loaded, meta = load_draft(out, tiny_target.identity())
    assert meta["target"]["name"] == "tiny_random"
    feat, emb = torch.randn(1, 5, cfg.hidden_size), torch.randn(1, 5, cfg.hidden_size)
    torch.testing.assert_close(loaded(feat, emb), draft(feat, emb))
    # frozen embedding / LM head are not stored
    from safetensors.torch import load_file

    assert not any("embed" in k or "lm_head" in k for k in load_file(out / "model.safetensors"))


def test_draft_for_another_target_is_refused(tmp_path, tiny_target):
    cfg = DraftConfig.from_target(tiny_target.config, depth=1)
    out = save_draft(DraftModel(cfg), tmp_path / "d", tiny_target.identity())
    other = dict(tiny_target.identity(), hidden_size=128, name="other")
    with pytest.raises(DraftMismatchError, match="hidden_size: draft 64 vs target 128"):
        load_draft(out, other)


def test_pickle_weights_are_refused_without_running_code(tmp_path, tiny_target):
    cfg = DraftConfig.from_target(tiny_target.config, depth=1)
    out = save_draft(DraftModel(cfg), tmp_path / "d", tiny_target.identity())
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (out / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_draft(out, tiny_target.identity())
    assert not marker.exists()

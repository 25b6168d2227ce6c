"""GGUF targets load tensor by tensor into our layouts: Q4_0 into int4 (the codes copied), Q8_0 into int8, F16 into
dense weights, equal to gguf's own dequantization where the formats match; bad files fail naming file and tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from helpers.engine import CheatDraft
from safetensors import safe_open

from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.models.gguf_io import GGUFError, open_gguf, write_random_gguf
from dovetail_infer.models.linear import QuantLinear
from dovetail_infer.models.llama import LlamaConfig
from dovetail_infer.models.target import load_target

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(
    vocab_size=256, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, rms_norm_eps=1e-5
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("gguf")
    cfg = LlamaConfig(**CFG)
    return {q: write_random_gguf(root / f"tiny-{q}.gguf", cfg, q, seed=3) for q in ("Q4_0", "Q8_0", "F16", "BF16")}


def load(path, tmp_path, **kw):
    spec = dict(name="tiny_gguf", source="gguf", path=str(path), cache_dir=str(tmp_path / "cache"), prepack=False)
    return load_target({**spec, **kw})


def gguf_weights(path) -> dict[str, torch.Tensor]:
    """gguf's own float32 dequantization of every tensor, under our module names (q/k rows in HF's order)."""
    reader = open_gguf(path)
    out = {}
    for t in reader.tensors:
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(*reversed(t.shape.tolist()))
        if ".attn_q." in t.name or ".attn_k." in t.name:  # undo llama.cpp's RoPE row interleaving
            heads = CFG["n_heads"] if ".attn_q." in t.name else CFG["n_kv_heads"]
            w = w.reshape(heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        out[t.name] = w
    per_layer = {}
    for i in range(CFG["n_layers"]):
        b = f"blk.{i}."
        per_layer[f"layers.{i}.self_attn.qkv_proj"] = torch.cat([out[b + f"attn_{p}.weight"] for p in "qkv"])
        per_layer[f"layers.{i}.self_attn.o_proj"] = out[b + "attn_output.weight"]
        per_layer[f"layers.{i}.mlp.gate_up_proj"] = torch.cat([out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"]])
        per_layer[f"layers.{i}.mlp.down_proj"] = out[b + "ffn_down.weight"]
        per_layer[f"layers.{i}.input_layernorm"] = out[b + "attn_norm.weight"]
        per_layer[f"layers.{i}.post_attention_layernorm"] = out[b + "ffn_norm.weight"]
    per_layer.update(
        embed_tokens=out["token_embd.weight"], norm=out["output_norm.weight"], lm_head=out["output.weight"]
    )
    return per_layer


def weight_of(model, name: str) -> torch.Tensor:
    mod = model.get_submodule(name)
    return mod.dequantized() if isinstance(mod, QuantLinear) else mod.weight.detach()


def test_q4_0_loads_into_int4_with_gguf_dequantization_bitwise(files, tmp_path):
    ref = gguf_weights(files["Q4_0"])
    target = load(files["Q4_0"], tmp_path, dtype="float32", quant="int4")
    lins = [m for m in target.model.modules() if isinstance(m, QuantLinear)]
    assert len(lins) == 4 * CFG["n_layers"] + 1 and all(m.bits == 4 for m in lins)
    for name, w in ref.items():
        assert torch.equal(weight_of(target.model, name), w), name  # linears, embedding, norms: bitwise
    assert all(m.weight is None for m in lins if m is not target.model.lm_head)  # no float copy of the layers
    assert torch.equal(target.model.lm_head.weight, ref["lm_head"])  # the draft's head copy stays dense


def test_q4_0_in_bfloat16_copies_the_codes_and_rounds_only_the_scales(files, tmp_path):
    ref = gguf_weights(files["Q4_0"])
    target = load(files["Q4_0"], tmp_path, dtype="bfloat16", quant="int4")
    assert {t.dtype for n, t in target.model.state_dict().items() if t.is_floating_point()} == {torch.bfloat16}
    for name in ("layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj", "lm_head"):
        w, d = ref[name], weight_of(target.model, name).float()
        blocks = w.reshape(w.shape[0], -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True) / 8  # Q4_0: the block's largest magnitude is 8 * d
        codes = (blocks / scale).round()
        assert torch.equal(codes * scale, blocks)  # the reference is d * (q - 8) ...
        expect = (codes * scale.bfloat16().float()).bfloat16().float().reshape(w.shape)
        assert torch.equal(d, expect), name  # ... and ours (q - 8) * bf16(d): the same codes, the scale rounded
    layout = next((tmp_path / "cache" / "targets").glob("*/weights/int4-g32-bfloat16-*"))
    for shard in layout.glob("*.safetensors"):  # the cached form holds no float32 tensor either
        with safe_open(shard, "pt") as f:
            assert all(f.get_slice(k).get_dtype() != "F32" for k in f.keys())


def test_q8_0_loads_into_int8_within_half_a_row_step(files, tmp_path):
    ref = gguf_weights(files["Q8_0"])
    target = load(files["Q8_0"], tmp_path, dtype="float32", quant="int8")
    for name in ("layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.1.self_attn.o_proj", "lm_head"):
        w, d = ref[name], weight_of(target.model, name)
        step = w.abs().amax(1, keepdim=True) / 127  # int8 has one scale per row, Q8_0 one per 32 inputs
        assert ((d - w).abs() <= 0.5 * step * (1 + 1e-6)).all() and (d != w).any(), name
    assert torch.equal(weight_of(target.model, "embed_tokens"), ref["embed_tokens"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_f16_loads_dense_exactly(files, tmp_path, dtype):
    ref = gguf_weights(files["F16"])
    target = load(files["F16"], tmp_path, dtype=str(dtype).removeprefix("torch."))
    assert not any(isinstance(m, QuantLinear) for m in target.model.modules())
    for name, w in ref.items():
        assert torch.equal(weight_of(target.model, name), w.to(dtype)), name


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings (Linux)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(a, 16) for a in parts[0].split("-"))
            out.append((start, end, parts[5]))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("qtype", ["BF16", "Q4_0"])
def test_dense_bfloat16_weights_are_the_cached_files_pages(files, tmp_path, qtype):
    """BF16 loads bitwise as written, Q4_0 as gguf dequantizes it (verify_cost --quant bf16 on a shape), and every
    weight lies in a mapping of a converted shard: held once, as the file's pages, no float32 or second copy."""
    ref = gguf_weights(files[qtype])
    target = load(files[qtype], tmp_path, dtype="bfloat16")
    for name, w in ref.items():  # BF16 -> float32 is exact; the norms are F32 in the file, rounded once
        got = weight_of(target.model, name)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), w.bfloat16().view(torch.int16))
    layout = next((tmp_path / "cache" / "targets").glob(f"tiny-{qtype}-*/weights/dense-bfloat16"))
    maps = [(a, b) for a, b, path in file_mappings() if Path(path).parent == layout]
    params = dict(target.model.named_parameters())
    assert len(params) == 2 + 6 * CFG["n_layers"] + 1
    for name, p in params.items():
        assert p.dtype == torch.bfloat16 and any(a <= p.data_ptr() < b for a, b in maps), name


def test_the_converted_form_is_cached_per_layout(files, tmp_path):
    a = load(files["Q4_0"], tmp_path, dtype="float32", quant="int4")
    folder = next((tmp_path / "cache" / "targets").glob("tiny-Q4_0-*"))
    assert folder.name == a.source_id and not (folder / "tokenizer_config.json").exists() and a.tokenizer is None
    assert sorted(p.name for p in (folder / "weights").iterdir()) == [
        "int4-g32-float32-torch" + torch.__version__.split("+")[0]
    ]
    b = load(files["Q4_0"], tmp_path, dtype="float32", quant="int4")  # from the cache now
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(a.model.logits(a.model(ids)), b.model.logits(b.model(ids)))
    load(files["Q4_0"], tmp_path, dtype="bfloat16", quant=None)
    assert len(list((folder / "weights").iterdir())) == 2


def test_int4_gguf_target_speculates_losslessly(files, tmp_path):
    target = load(files["Q4_0"], tmp_path, dtype="float32", quant="int4")
    ids, n = [3, 17, 42, 99, 7], 16
    ref = Dovetail(target, None, "cpu").generate_baseline(ids, InferConfig(max_new_tokens=n)).output_ids
    eng = Dovetail(target, CheatDraft(target, ids + ref), "cpu")
    r = eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n))
    assert r.output_ids == ref and r.tau > 1.5


def test_truncated_gguf_names_file_and_tensor(files, tmp_path):
    bad = tmp_path / "cut.gguf"
    data = files["Q4_0"].read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"cut\.gguf: tensor 'output\.weight' ends at byte \d+ but the file has"):
        load(bad, tmp_path, quant="int4")
    bad.write_bytes(data[:100])
    with pytest.raises(GGUFError, match=r"cut\.gguf: not a readable GGUF file"):
        load(bad, tmp_path, quant="int4")


@pytest.mark.parametrize("quant", ["int4", None])
def test_corrupted_tensor_names_file_and_tensor(files, tmp_path, quant):
    reader = open_gguf(files["Q4_0"])
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    data = bytearray(files["Q4_0"].read_bytes())
    data[t.data_offset + 18 * 3 : t.data_offset + 18 * 3 + 2] = np.float16(np.nan).tobytes()  # block 3's scale
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"nan\.gguf: tensor 'blk\.1\.ffn_down\.weight' \(Q4_0.*non-finite"):
        load(bad, tmp_path, quant=quant)
    assert not list((tmp_path / "cache").rglob("*.tmp*"))  # no half-converted layout left behind


def test_shape_target_writes_its_gguf_once(tmp_path):
    spec = dict(name="tiny_shape", source="shape", random_config=CFG, cache_dir=str(tmp_path), quant="int4")
    a = load_target(spec)
    shape_files = list((tmp_path / "shapes").glob("tiny_shape-Q4_0-*.gguf"))
    assert len(shape_files) == 1 and a.tokenizer is None and a.config.hidden_size == CFG["hidden_size"]
    mtime = shape_files[0].stat().st_mtime_ns
    b = load_target(spec)
    assert shape_files[0].stat().st_mtime_ns == mtime and a.source_id == b.source_id


def test_int8_weights_at_an_unaligned_address_are_copied():
    """Weights memory-mapped from a converted file can start 8 bytes past a 64-byte boundary; aten's int8 kernel
    segfaulted on such a buffer for 4+ rows (the 7B shape). from_quantized copies them; the numbers are unchanged."""
    from dovetail_infer.models.linear import QuantLinear

    N, K = 512, 256
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(-127, 127, (N * K + 8,), dtype=torch.int8, generator=g)
    unaligned = buf[8:].view(N, K) if buf[8:].data_ptr() % 64 else buf[1:].view(N, K)
    scales = torch.rand(N, generator=g).bfloat16()
    lin = QuantLinear.from_quantized(unaligned, scales, 8, 32, N, K)
    assert lin.qweight.data_ptr() % 64 == 0 and torch.equal(lin.qweight, unaligned)
    x = torch.randn(4, K, generator=g).bfloat16()
    ref = QuantLinear.from_quantized(unaligned.clone(), scales, 8, 32, N, K)(x)
    assert torch.equal(lin(x), ref)

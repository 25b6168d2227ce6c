"""Weight-only int8 / int4 targets: the kernels multiply by the weights they report, a Q4_1 checkpoint
re-quantizes exactly, and decoding stays lossless against the quantized model's own greedy decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import target_spec
from helpers.engine import CheatDraft, prompt

from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.models.linear import QuantLinear, quantize_linears
from dovetail_infer.models.target import load_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def int4_target():
    return load_target(target_spec("tiny_random", quant="int4"))


@torch.no_grad()
def naive_greedy(target, ids: list[int], n: int) -> list[int]:
    """The model's own greedy decoding, recomputing the whole sequence every step (no cache, no engine)."""
    out: list[int] = []
    for _ in range(n):
        h = target.model(torch.tensor([ids + out]))
        out.append(int(target.model.logits(h[:, -1]).argmax()))
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_multiplies_by_its_dequantized_weight(bits, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=False).to(dtype)
    q = QuantLinear(lin, bits)
    w, d = lin.weight.float(), q.dequantized().float()
    if bits == 8:  # half a step of the row's scale
        step = w.abs().amax(1, keepdim=True) / 127
    else:  # half a step of the group's (max - min) / 15
        g = w.reshape(96, 4, 32)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, 1)
    rounding = 1e-6 if dtype == torch.float32 else 2**-7 * w.abs()  # bf16: scales and outputs are rounded
    assert ((d - w).abs() <= 0.51 * step + rounding).all()
    assert (d != w).any()  # it did quantize
    x = torch.randn(2, 5, 128).to(dtype)
    y = q(x)
    assert y.shape == (2, 5, 96) and y.dtype == dtype
    ref = x.float() @ d.t()
    atol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=0.02)


def test_q4_1_weights_requantize_exactly():
    """GGUF Q4_1 stores w = d*q + m per 32 inputs, q in 0..15: int4 with group 32 gets those weights back."""
    torch.manual_seed(1)
    N, K = 32, 64
    q = torch.randint(0, 16, (N, K // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # the quantizer's min and max are in every block
    d = torch.rand(N, K // 32, 1) * 0.01 + 1e-3
    m = -torch.rand(N, K // 32, 1) * 0.05
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = (d * q + m).reshape(N, K)
    torch.testing.assert_close(QuantLinear(lin, 4).dequantized(), lin.weight.data, atol=1e-6, rtol=0)


def test_bad_quant_settings_fail_clearly():
    with pytest.raises(ValueError, match="target.quant must be null or one of"):
        load_target(target_spec("tiny_random", quant="int3"))
    with pytest.raises(ValueError, match="CPU kernels"):
        load_target(target_spec("tiny_random", quant="int4", device="cuda"))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantLinear(torch.nn.Linear(32, 32, bias=False), 2)
    odd = torch.nn.Sequential(torch.nn.Linear(40, 16, bias=False), torch.nn.Linear(64, 32, bias=False))
    assert quantize_linears(odd, "int4") == 1  # 40 inputs do not split into groups of 32: left as it was
    assert isinstance(odd[0], torch.nn.Linear) and isinstance(odd[1], QuantLinear)


def test_int4_target_quantizes_every_linear_and_keeps_the_draft_check(int4_target, tiny_target):
    lins = [m for m in int4_target.model.modules() if isinstance(m, QuantLinear)]
    assert len(lins) == 2 * 4 + 1  # q/k/v fused, o, gate/up fused, down per layer, and the LM head
    assert all(m.bits == 4 for m in lins)
    assert int4_target.identity() == tiny_target.identity()  # drafts trained on the float target still load
    ids = torch.tensor([prompt(int4_target, 0)])
    with torch.no_grad():
        a = int4_target.model.logits(int4_target.model(ids))
        b = tiny_target.model.logits(tiny_target.model(ids))
    assert not torch.equal(a, b)  # a different model ...
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95  # ... close to the float one


@pytest.mark.parametrize("compile", [False, True])
def test_int4_decoding_equals_its_own_greedy(int4_target, compile):
    n = 24
    ids = prompt(int4_target, 1)
    ref = naive_greedy(int4_target, ids, n)
    base = Dovetail(int4_target, None, "cpu", compile=compile).generate_baseline(ids, InferConfig(max_new_tokens=n))
    assert base.output_ids == ref
    eng = Dovetail(int4_target, CheatDraft(int4_target, ids + ref), "cpu", compile=compile)
    r = eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n))
    assert r.output_ids == ref and r.tau > 1.5


def q8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int8 activations per 32 inputs (x = dx * x8, dx = amax / 127, round half to even) times `w`, in fp32."""
    xg = x.float().reshape(-1, x.shape[-1] // 32, 32)
    dx = xg.abs().amax(-1, keepdim=True) / 127
    x8 = (xg * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))).round().clamp(-127, 127)
    return ((x8 * dx).reshape(*x.shape) @ w.t()).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4a8_kernel_multiplies_q8_activations_by_its_q4_weights_row_by_row(dtype):
    """Our VNNI kernel: the weight it reports is the Q4_1 quantization (half a step of the group's range),
    its products equal int8-quantized activations times that weight, and a row's result does not depend on
    the other rows of the call (bitwise), which keeps speculative verification exact."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=False).to(dtype)
    q = QuantLinear(lin, 4, act8=True)
    w, d = lin.weight.float(), q.dequantized().float()
    g = w.reshape(48, 3, 32)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, 1)
    assert ((d - w).abs() <= 0.51 * step + 2**-10 * w.abs().amax()).all() and (d != w).any()
    x = torch.randn(2, 5, 96).to(dtype)
    x[0, 0, :32] = 0  # an all-zero group quantizes to zeros
    y = q(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    ref = q8_reference(x, d)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.02, rtol=0.01)
    torch.testing.assert_close(y.float(), ref, **tol)
    assert (y.float() - x.float() @ d.t()).abs().max() > 1e-5  # the activations were quantized
    rows = x.reshape(10, 96)
    assert torch.equal(torch.cat([q(rows[i : i + 1]) for i in range(10)]), y.reshape(10, 48))


def test_int4a8_needs_vnni_and_q4_groups(monkeypatch):
    from dovetail_infer import kernels

    lin = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError, match="bits=4 and group=32"):
        QuantLinear(lin, 4, group=64, act8=True)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(RuntimeError, match="AVX512-VNNI.*use quant=int4"):
        QuantLinear(lin, 4, act8=True)


@pytest.mark.parametrize("compile", [False, True])
def test_int4a8_decoding_equals_its_own_greedy(compile):
    target = load_target(target_spec("tiny_random", quant="int4a8"))
    assert all(m.act8 for m in target.model.modules() if isinstance(m, QuantLinear))
    n, ids = 24, prompt(target, 1)
    ref = naive_greedy(target, ids, n)
    base = Dovetail(target, None, "cpu", compile=compile).generate_baseline(ids, InferConfig(max_new_tokens=n))
    assert base.output_ids == ref
    eng = Dovetail(target, CheatDraft(target, ids + ref), "cpu", compile=compile)
    r = eng.generate(ids, InferConfig(budget=4, depth=3, top_k=2, max_new_tokens=n, lookup=3))
    assert r.output_ids == ref and r.tau > 1.5

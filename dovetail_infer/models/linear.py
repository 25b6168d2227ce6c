"""CPU linear backends for a frozen target: oneDNN-prepacked bf16/fp32 and weight-only int8/int4 (+ int4a8).

`pack_linears` / `quantize_linears` swap a module's `nn.Linear`s in place; state-dict keys stay the same.
"""

from __future__ import annotations

import torch
from torch import nn

from dovetail_infer import kernels


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight is prepacked once for oneDNN (CPU inference).

    `F.linear` on a CPU reorders the weight into oneDNN's blocked layout on every call; for the few-row
    products of decoding and verification that costs as much as the product itself. Packing once
    halves the time of a decoding step (measured, bf16 and fp32) and gives bitwise the same results.
    `weight` stays (same state_dict keys; a tied LM head still shares the embedding).

    Batch invariance: in bf16, oneDNN computes a single row (M=1) with a kernel that splits long
    reductions (K > 1024 here: the down projection) differently from its multi-row kernel, so a token
    decoded alone and the same token verified among others could round apart and greedy speculative
    decoding would drift from one-token decoding at near-ties. A lone bf16 row therefore runs as a
    duplicated pair: every row then gets bitwise the result it gets among 2..33 rows (tested), at no
    measurable cost (bf16, 2 threads: 7.11 vs 7.18 ms of products per SmolLM2 forward, cache-hot).
    float32 keeps M=1 (there a pair costs 1.5x).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the packed kernel needs the weight's dtype (autocast, e.g. online features in bf16-mixed training,
        # would hand it another one); the frozen target then computes in its own dtype
        x = x.to(self.weight.dtype)
        rows = x.reshape(-1, x.shape[-1])
        single = rows.shape[0] == 1 and x.dtype != torch.float32
        if single:  # see `PackedLinear`: a lone bf16 row goes through the multi-row kernel, as a pair
            rows = rows.expand(2, -1).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        if single:
            y = y[:1]
        return y.reshape(*x.shape[:-1], y.shape[-1])


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linears(module: nn.Module) -> nn.Module:
    """Swap every nn.Linear of a frozen CPU module for a PackedLinear (inference only, in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module


class QuantLinear(nn.Module):
    """A frozen CPU linear with weight-only quantized weights: int8 (symmetric, one scale per output row)
    or int4 (asymmetric, a scale and a zero point per `group` inputs; GGUF's Q4_1 layout, so a Q4_1
    checkpoint re-quantizes almost exactly). Activations stay in the model dtype, except with `act8`
    (quant=int4a8): int4 weights times activations quantized to int8 per 32 inputs, on our VNNI kernel
    (`dovetail_infer.kernels`), llama.cpp's arithmetic for Q4_1.

    Decoding reads a quarter (int4) or half (int8) of the bf16 bytes: a SmolLM2 decoding step's matrix
    products fall from ~14 ms to ~5 ms (int4) here. The kernels scale badly with rows (int4: 5 rows cost
    ~3x one), so a quantized target verifies short drafts only. The quantized model *is* the target:
    lossless means equal to its own greedy decoding. `weight` stays (the draft's head copy, HF reference).
    """

    def __init__(self, linear: nn.Linear, bits: int, group: int = 32, act8: bool = False) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear: biased linears are not supported")
        self.weight, self.bits, self.group, self.act8 = linear.weight, bits, group, act8
        w = linear.weight.detach().float()
        N, K = w.shape
        self.out_features, self.in_features = N, K
        dtype = linear.weight.dtype
        if act8:  # int4 weights x int8 activations (llama.cpp's Q4_1 x Q8_1) on our AVX512-VNNI kernel
            if bits != 4 or group != kernels.GROUP:
                raise ValueError(f"QuantLinear: int8 activations need bits=4 and group={kernels.GROUP}")
            kernels.load_q4a8()
            qw, dm = kernels.pack_q4(w)
            self.register_buffer("qweight", qw)
            self.register_buffer("scales", dm)
        elif bits == 8:
            scale = (w.abs().amax(1) / 127).clamp(min=1e-10)
            self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
            self.register_buffer("scales", scale.to(dtype))
        elif bits == 4:
            if not quantizable(linear, 4, group):
                raise ValueError(f"int4 needs in_features % {group} == 0 and out_features % 16 == 0, got {N}x{K}")
            wg = w.reshape(N, K // group, group)
            lo, hi = wg.amin(-1), wg.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-10)
            q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(N, K)
            # the kernel dequantizes (q - 8) * scale + zero
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales", torch.stack([scale.t(), (lo + 8 * scale).t()], -1).to(dtype).contiguous())
        else:
            raise ValueError(f"QuantLinear: bits must be 4 or 8, got {bits}")

    @classmethod
    def from_quantized(
        cls, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group: int, out_features: int, in_features: int
    ) -> QuantLinear:
        """A QuantLinear from its kernel buffers (`qweight`, `scales` as the constructor makes them), without
        a float weight: `weight` is None unless one is assigned (GGUF targets load this way, never in float)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bits, self.group, self.act8 = bits, group, False
        self.out_features, self.in_features = out_features, in_features
        self.register_parameter("weight", None)
        if bits == 8 and qweight.data_ptr() % 64:  # a memory-mapped file's offset: the int8 kernel crashed at >= 4 rows
            qweight = qweight.clone()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        return self

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, (out, in) in the model dtype (tests and error reports)."""
        if self.act8:
            return kernels.unpack_q4(self.qweight, self.scales, *self.weight.shape).to(self.weight.dtype)
        eye = torch.eye(self.in_features, dtype=self.scales.dtype, device=self.scales.device)
        return self(eye).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act8:
            return torch.ops.dovetail.q4a8_linear(
                x.to(self.weight.dtype), self.qweight, self.scales, self.weight.shape[0]
            )
        x2 = x.to(self.scales.dtype).reshape(-1, x.shape[-1]).contiguous()  # the scales are in the model dtype
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group, self.scales)
        return y.reshape(*x.shape[:-1], y.shape[-1])


# int4a8: int4 weights and int8 activations (dynamic, per 32 inputs), llama.cpp's Q4_1 x Q8_1 arithmetic
QUANT_BITS = {"int8": 8, "int4": 4, "int4a8": 4}


def quant_linear(linear: nn.Linear, quant: str, group: int = 32) -> QuantLinear:
    """A QuantLinear for a `quant` name (int8 / int4 / int4a8): the one place names map to kernels."""
    return QuantLinear(linear, QUANT_BITS[quant], group, act8=quant == "int4a8")


def quantizable(linear: nn.Linear, bits: int, group: int = 32) -> bool:
    N, K = linear.weight.shape
    return linear.bias is None and (bits == 8 or (K % group == 0 and N % 16 == 0))


def quantize_linears(module: nn.Module, quant: str, group: int = 32) -> int:
    """Swap every nn.Linear of a frozen CPU module for a QuantLinear (`quant`: int8 or int4), in place.
    Linears whose shape the kernel cannot take stay as they are. Returns how many were quantized."""
    if quant not in QUANT_BITS:
        raise ValueError(f"quant must be one of {sorted(QUANT_BITS)} (or null), got {quant!r}")
    bits, n = QUANT_BITS[quant], 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and quantizable(child, bits, group):
            setattr(module, name, quant_linear(child, quant, group))
            n += 1
        elif not isinstance(child, nn.Linear):
            n += quantize_linears(child, quant, group)
    return n

"""Our own CPU kernels, compiled on first use with torch.utils.cpp_extension (a C++ compiler is needed, as
for torch.compile). The build is cached by torch (~15 s the first time on a machine).

`q4a8_linear`: int4 weights (GGUF Q4_1 layout: w = d * q + m per 32 inputs, d and m in fp16) times
activations quantized to int8 per 32 inputs on the fly (Q8_1) — llama.cpp's arithmetic, on AVX512-VNNI.
Against PyTorch's eager int4 weight-only kernel (which widens every weight to bf16) one product costs
1.5-2.5x less; inside a max-autotune step it is even with inductor's int4 GEMM template for one row and
cheaper for several (README, "Against llama.cpp").
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

GROUP, NBLK = 32, 16  # inputs per scale, outputs per packed block (fixed by the kernel)
NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"]


@functools.cache
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def load_q4a8() -> None:
    """Build (or load the cached build of) the kernel, registered as `torch.ops.dovetail.q4a8_linear` and
    opaque to torch.compile. A clear error where the CPU lacks AVX512-VNNI (checked on every call)."""
    missing = [f for f in NEEDS if f not in cpu_flags()]
    if missing:
        raise RuntimeError(
            f"quant=int4a8 needs an x86 CPU with AVX512-VNNI; this one lacks {missing}: use quant=int4 instead"
        )
    _build()


@functools.cache
def _build() -> None:
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name("q4a8.cpp")
    load(name="dovetail_q4a8", sources=[str(src)], is_python_module=False, extra_cflags=CFLAGS)

    @torch.library.register_fake("dovetail::q4a8_linear")
    def _(x: torch.Tensor, qw: torch.Tensor, dm: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], n)


def pack_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (packed nibbles uint8 (N*K/2,), scales fp16 (N*K/16,)) in the kernel's layout.

    Per group of 32 inputs: d = (max - min) / 15, m = min, both rounded to fp16 first (Q4_1 stores them so),
    q = round((w - m) / d). Per block of 16 outputs and group: four 64-byte vectors, byte 4n + j of vector v
    holding input 8v + j (low nibble) and 8v + 4 + j (high nibble) of output n; then 16 d's and 16 m's.
    """
    N, K = w.shape
    if K % GROUP or N % NBLK:
        raise ValueError(f"int4a8 needs in_features % {GROUP} == 0 and out_features % {NBLK} == 0, got {N}x{K}")
    G = K // GROUP
    wg = w.detach().float().reshape(N, G, GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-7).half()
    m = lo.half()
    q = ((wg - m.float()[..., None]) / d.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    qb = q.reshape(N // NBLK, NBLK, G, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # block, group, vector, n, j, nibble
    packed = (qb[..., 0] | (qb[..., 1] << 4)).contiguous().reshape(-1)
    dm = torch.stack([d.reshape(N // NBLK, NBLK, G), m.reshape(N // NBLK, NBLK, G)], 2)  # block, n, (d|m), group
    return packed, dm.permute(0, 3, 2, 1).contiguous().reshape(-1)


def unpack_q4(packed: torch.Tensor, dm: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack_q4`: the (N, K) float32 weight the kernel multiplies by."""
    G = k // GROUP
    pb = packed.reshape(n // NBLK, G, 4, NBLK, 4)
    q = torch.stack([pb & 0x0F, pb >> 4], -1)  # block, group, vector, n, j, nibble
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(n, G, GROUP).float()
    s = dm.reshape(n // NBLK, G, 2, NBLK).permute(0, 3, 1, 2).reshape(n, G, 2).float()
    return (q * s[..., :1] + s[..., 1:]).reshape(n, k)

"""GGUF files, tensor by tensor: into our CPU layouts without a float32 copy of the model, and random-weight
GGUFs of a given config (the 7B/13B *shapes* used to measure verification cost).

A GGUF target is converted once per layout (quant, group, dtype) into sharded safetensors, one shard per
decoder layer, next to the metadata folder `convert_gguf` makes; loading maps those shards (safetensors'
`load_file`), so the model's buffers are the cached file's pages. Conversion memory-maps the GGUF and holds one
layer's tensors at a time.

Per GGUF tensor type and `target.quant`:
- Q4_0 / Q4_1 with int4 (group 32): the 4-bit codes are copied into the int4 kernel's layout and each block's
  scale (and Q4_1's minimum) becomes the group's scale and zero. Exact in float32. In bfloat16 the scales are
  rounded to bfloat16 (Q4_0); Q4_1 re-quantizes from the bfloat16 weights instead, which is what it did before
  this loader and keeps the embedded SmolLM2 target's numbers.
- every other (type, quant) pair: the tensor is dequantized (gguf's own dequantization, float32, one tensor at a
  time), cast to the model dtype and, with a quant, quantized by `QuantLinear` (Q8_0 with int8: per row, since
  the int8 kernel takes one scale per row and Q8_0 has one per 32 inputs).
The log lists, per tensor type, how its tensors were converted.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dovetail_infer.models.linear import QUANT_BITS, QuantLinear, quant_linear, quantizable
from dovetail_infer.models.llama import LlamaConfig, LlamaModel, rope_inv_freq

log = logging.getLogger(__name__)

Q4_TYPES = ("Q4_0", "Q4_1")
# GGUF names (llama.cpp's) -> our module names; parts of a fused matrix are (module, index)
GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
LAYER_NAMES: dict[str, str | tuple[str, int]] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": "self_attn.o_proj",
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": "mlp.down_proj",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and, where known, the tensor."""


def open_gguf(path: str | Path):
    """A GGUFReader (memory-mapped) whose every tensor lies inside the file."""
    from gguf import GGUFReader

    path = Path(path)
    size = path.stat().st_size

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            for field in fields:  # name the first tensor past the end before gguf fails on it without a name
                _, name, _, dims, raw_type, offset = field.parts
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                except (ValueError, KeyError) as e:
                    raise GGUFError(f"{path}: tensor {bytes(name).decode()!r} has an unknown type {raw_type[0]}") from e
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise GGUFError(
                        f"{path}: tensor {bytes(name).decode()!r} ends at byte {end} but the file has {size} bytes "
                        "(truncated file?)"
                    )
            super()._build_tensors(start_offs, fields)

    try:
        return Reader(path)
    except GGUFError:
        raise
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def field_value(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    return v


def hf_config(reader, path: Path) -> dict[str, Any]:
    """A transformers-style Llama config dict from a GGUF's metadata (architecture llama only)."""
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (Dovetail loads llama GGUFs)")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")
    get = lambda k, d=None: field_value(reader, f"llama.{k}", d)  # noqa: E731
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(get("vocab_size", int(embd.shape[1]))),
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "intermediate_size": int(get("feed_forward_length")),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    for key in ("bos", "eos", "padding"):
        tok = field_value(reader, f"tokenizer.ggml.{key}_token_id")
        if tok is not None:
            cfg[f"{'pad' if key == 'padding' else key}_token_id"] = int(tok)
    return cfg


def layout_name(quant: str | None, group: int, dtype: torch.dtype) -> str:
    """The converted form's folder name: what the tensors are (the int4 packing is torch's, hence its version)."""
    dt = str(dtype).removeprefix("torch.")
    if quant in (None, "int4a8"):  # int4a8 quantizes at load time from the model dtype (its own kernel layout)
        return f"dense-{dt}"
    group_part = f"-g{group}" if QUANT_BITS[quant] == 4 else ""
    return f"{quant}{group_part}-{dt}-torch{torch.__version__.split('+')[0]}"


def _q_k_rows(name: str, n_rows: int, cfg: LlamaConfig) -> np.ndarray | None:
    """llama.cpp stores q and k with each head's rows interleaved for its RoPE; the row order that undoes it."""
    heads = cfg.n_heads if name == "attn_q" else cfg.n_kv_heads if name == "attn_k" else None
    if heads is None:
        return None
    return np.arange(n_rows).reshape(heads, n_rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


class _Tensor:
    """One GGUF tensor as (rows, cols) in our (HF) row order, read lazily from the memory map."""

    def __init__(self, path: Path, t, cfg: LlamaConfig, short: str) -> None:
        self.path, self.name, self.type = path, t.name, t.tensor_type.name
        self.raw, self.qtype = t.data, t.tensor_type
        self.shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        self.rows = _q_k_rows(short, self.shape[0], cfg) if len(self.shape) == 2 else None

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: tensor {self.name!r} ({self.type}, shape {list(self.shape)}): {what}")

    def raw_rows(self) -> np.ndarray:
        raw = self.raw.reshape(self.shape[0], -1) if len(self.shape) == 2 else self.raw
        return raw[self.rows] if self.rows is not None else raw

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """gguf's own dequantization in float32, then `dtype` (the float32 copy is this tensor's only)."""
        from gguf.quants import dequantize

        try:
            a = np.ascontiguousarray(dequantize(self.raw_rows(), self.qtype), dtype=np.float32)
        except Exception as e:
            raise self.fail(f"cannot be dequantized ({type(e).__name__}: {e})") from e
        w = torch.from_numpy(a if a.flags.writeable else a.copy())  # F32 comes back as a view of the file
        w = w.reshape(self.shape)
        if not torch.isfinite(w).all():
            raise self.fail("holds non-finite values (corrupted?)")
        return w.to(dtype)

    def q4_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """codes (N, K) uint8 in 0..15, scales d (N, K/32) and, for Q4_1, minimums m (N, K/32), float32."""
        N, K = self.shape
        nb = K // 32
        raw = np.ascontiguousarray(self.raw_rows()).reshape(N, nb, -1)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if self.type == "Q4_1" else None
        qs = raw[..., 4 if m is not None else 2 :]  # byte j: element j (low nibble) and j + 16 (high nibble)
        codes = np.concatenate([qs & 0x0F, qs >> 4], -1).reshape(N, K)
        if not (np.isfinite(d).all() and (m is None or np.isfinite(m).all())):
            raise self.fail("has non-finite block scales (corrupted?)")
        return codes, d, m


def _int4_from_q4(parts: list[_Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 kernel buffers (qweight, scales) from Q4_0/Q4_1 blocks: w = (q - 8) * scale + zero per 32 inputs."""
    blocks = [p.q4_blocks() for p in parts]
    codes = np.concatenate([b[0] for b in blocks]) if len(blocks) > 1 else blocks[0][0]
    d = np.concatenate([b[1] for b in blocks]).astype(np.float64)
    m = [b[2] if b[2] is not None else -8 * b[1] for b in blocks]  # Q4_0: w = d * (q - 8), zero 0
    zero = (np.concatenate(m).astype(np.float64) + 8 * d).astype(np.float32)  # one rounding (none for Q4_0)
    scales = torch.stack([torch.from_numpy(d.astype(np.float32)).t(), torch.from_numpy(zero).t()], -1)
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes).to(torch.int32), 1)
    return qweight, scales.to(dtype).contiguous()


def _convert_linear(
    key: str, parts: list[_Tensor], quant: str | None, group: int, dtype: torch.dtype, how: Counter
) -> dict[str, torch.Tensor]:
    """One of our linears (q/k/v and gate/up fused) as state-dict entries in the layout."""
    kinds = {p.type for p in parts}
    if quant is not None and quant != "int4a8":
        bits = QUANT_BITS[quant]
        K = parts[0].shape[1]
        N = sum(p.shape[0] for p in parts)
        direct = bits == 4 and group == 32 and kinds <= set(Q4_TYPES) and K % 32 == 0 and N % 16 == 0
        if direct and (dtype == torch.float32 or kinds == {"Q4_0"}):
            qweight, scales = _int4_from_q4(parts, dtype)
            for p in parts:
                how[(p.type, f"int4, codes copied, scales in {_dt(dtype)}")] += 1
            return {f"{key}.qweight": qweight, f"{key}.scales": scales}
    w = torch.cat([p.dense(dtype) for p in parts]) if len(parts) > 1 else parts[0].dense(dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if quant is not None and quant != "int4a8" and quantizable(lin, QUANT_BITS[quant], group):
        q = quant_linear(lin, quant, group)
        for p in parts:
            how[(p.type, f"{quant}, re-quantized from {_dt(dtype)}")] += 1
        return {f"{key}.qweight": q.qweight, f"{key}.scales": q.scales}
    for p in parts:
        how[(p.type, _dt(dtype))] += 1
    return {f"{key}.weight": w}


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _group_tensors(reader, path: Path, cfg: LlamaConfig) -> tuple[dict[str, _Tensor], list[dict[str, _Tensor]]]:
    """The GGUF's tensors by our names: globals, and one dict per layer (GGUF short names)."""
    glob: dict[str, _Tensor] = {}
    layers: list[dict[str, _Tensor]] = [{} for _ in range(cfg.n_layers)]
    for t in reader.tensors:
        base = t.name.removesuffix(".weight")
        if base in GLOBAL_NAMES:
            glob[base] = _Tensor(path, t, cfg, base)
        elif base.startswith("blk."):
            _, i, short = base.split(".", 2)
            if short in LAYER_NAMES and int(i) < cfg.n_layers:
                layers[int(i)][short] = _Tensor(path, t, cfg, short)
                continue
            if short == "rope_freqs":
                raise GGUFError(f"{path}: tensor {t.name!r}: scaled RoPE frequencies are not supported")
            log.warning("%s: tensor %s is not used", path, t.name)
        elif base != "rope_freqs":
            log.warning("%s: tensor %s is not used", path, t.name)
    missing = [f"{g}.weight" for g in ("token_embd", "output_norm") if g not in glob]
    missing += [f"blk.{i}.{s}.weight" for i, lay in enumerate(layers) for s in LAYER_NAMES if s not in lay]
    if missing:
        raise GGUFError(f"{path}: missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    return glob, layers


def _drop_pages(reader) -> None:
    """Unmap the file pages read so far from this process (they stay in the page cache): the memory map would
    otherwise count the whole GGUF in the converting process's RSS by the last layer."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def _expect(t: _Tensor, shape: tuple[int, ...]) -> None:
    if t.shape != shape:
        raise t.fail(f"expected shape {list(shape)} from the file's config")


def _layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Each decoder layer's GGUF tensors (short names) and their shapes, in llama.cpp's order within a layer."""
    D, hd, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    return {
        "attn_norm": (D,),
        "attn_q": (cfg.n_heads * hd, D),
        "attn_k": (cfg.n_kv_heads * hd, D),
        "attn_v": (cfg.n_kv_heads * hd, D),
        "attn_output": (D, cfg.n_heads * hd),
        "ffn_norm": (D,),
        "ffn_gate": (F, D),
        "ffn_up": (F, D),
        "ffn_down": (D, F),
    }


def convert_weights(gguf: Path, out: Path, cfg: LlamaConfig, quant: str | None, group: int, dtype: torch.dtype) -> None:
    """The GGUF's weights in one layout as safetensors shards in `out` (one per layer), tensor by tensor."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # another process may be converting the same layout
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _convert(gguf, tmp, cfg, quant, group, dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # the other process finished first: same content
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)


def _convert(gguf: Path, tmp: Path, cfg: LlamaConfig, quant: str | None, group: int, dtype: torch.dtype) -> None:
    reader = open_gguf(gguf)
    glob, layers = _group_tensors(reader, gguf, cfg)
    how: Counter = Counter()
    D, shapes = cfg.hidden_size, _layer_shapes(cfg)
    for i, lay in enumerate(layers):
        sd: dict[str, torch.Tensor] = {}
        fused: dict[str, list[tuple[int, _Tensor]]] = {}
        for short, t in lay.items():
            _expect(t, shapes[short])
            target = LAYER_NAMES[short]
            if isinstance(target, tuple):
                fused.setdefault(target[0], []).append((target[1], t))
            elif short.endswith("norm"):
                sd[f"layers.{i}.{target}.weight"] = t.dense(dtype)
                how[(t.type, _dt(dtype))] += 1
            else:
                sd.update(_convert_linear(f"layers.{i}.{target}", [t], quant, group, dtype, how))
        for name, parts in fused.items():
            sd.update(_convert_linear(f"layers.{i}.{name}", [t for _, t in sorted(parts)], quant, group, dtype, how))
        save_file(sd, tmp / f"model-{i + 1:05d}.safetensors")
        del sd
        _drop_pages(reader)
    embed, norm, head = glob["token_embd"], glob["output_norm"], glob.get("output", glob["token_embd"])
    _expect(embed, (cfg.vocab_size, D))
    _expect(norm, (D,))
    _expect(head, (cfg.vocab_size, D))
    sd = {"embed_tokens.weight": embed.dense(dtype), "norm.weight": norm.dense(dtype)}
    how[(embed.type, _dt(dtype))] += 1
    how[(norm.type, _dt(dtype))] += 1
    if "output" in glob or quant not in (None, "int4a8"):  # a tied dense head is the embedding itself
        sd.update(_convert_linear("lm_head", [head], quant, group, dtype, how))
    if "lm_head.weight" not in sd and "output" in glob:  # the draft copies the target's head: keep a dense one
        sd["lm_head.weight"] = head.dense(dtype)
    save_file(sd, tmp / "model-00000.safetensors")
    del sd, reader
    lines = [f"{typ} -> {layout}: {n} tensors" for (typ, layout), n in sorted(how.items())]
    (tmp / "conversion.json").write_text(json.dumps({"gguf": str(gguf), "tensors": lines}, indent=1))
    log.info("%s converted (%s, group %d, %s): %s", gguf.name, quant or "dense", group, _dt(dtype), "; ".join(lines))


def load_converted(folder: Path, cfg: LlamaConfig, quant: str | None, group: int) -> LlamaModel:
    """Our Llama from a converted layout folder: every tensor is a buffer of the model as stored."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    bits = QUANT_BITS[quant] if quant not in (None, "int4a8") else None
    for shard in sorted(folder.glob("model-*.safetensors")):
        sd = load_file(shard)
        for key in [k for k in sd if k.endswith(".qweight")]:
            mod_name = key.removesuffix(".qweight")
            parent_name, _, attr = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            N, K = getattr(parent, attr).weight.shape
            ql = QuantLinear.from_quantized(sd.pop(key), sd.pop(f"{mod_name}.scales"), bits, group, N, K)
            setattr(parent, attr, ql)
        for key, t in sd.items():
            parent_name, _, attr = key.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, nn.Parameter(t, requires_grad=False))
    if cfg.tie_word_embeddings or model.lm_head.weight is None:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta and n != "inv_freq"]
    if left:
        raise GGUFError(f"{folder}: the converted weights lack {left[:5]} (delete the folder to convert again)")
    return model


def _random_gguf_tensors(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a llama GGUF of `cfg` (name, shape), in file order."""
    D = cfg.hidden_size
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (cfg.vocab_size, D))]
    for i in range(cfg.n_layers):
        tensors += [(f"blk.{i}.{short}.weight", shape) for short, shape in _layer_shapes(cfg).items()]
    tensors.append(("output_norm.weight", (D,)))
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", (cfg.vocab_size, D)))
    return tensors


def _add_llama_metadata(w: Any, cfg: LlamaConfig, name: str) -> None:
    """The llama.* keys `open_gguf` / `hf_config` read back as `cfg`."""
    hd = cfg.head_dim
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(hd)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def _random_weight(
    tname: str, shape: tuple[int, ...], qt: Any, rng: np.random.Generator, rows_per_chunk: int
) -> np.ndarray:
    """Seeded random data of one tensor: a norm near 1 in F32, or a 2-D weight quantized to `qt` a chunk of
    float32 rows at a time (the whole float32 matrix is never held)."""
    from gguf.quants import quant_shape_to_byte_shape, quantize

    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    N, K = shape
    std = np.float32(1.0 if tname == "token_embd.weight" else K**-0.5)  # unit-variance outputs
    out = np.empty(quant_shape_to_byte_shape(shape, qt), dtype=np.uint8)
    for r in range(0, N, rows_per_chunk):
        x = rng.standard_normal((min(rows_per_chunk, N - r), K), dtype=np.float32) * std
        out[r : r + len(x)] = quantize(x, qt).view(np.uint8).reshape(len(x), -1)
    return out


def write_random_gguf(
    path: Path, cfg: LlamaConfig, qtype: str = "Q4_0", seed: int = 0, name: str = "random", rows_per_chunk: int = 512
) -> Path:
    """A llama GGUF of `cfg`'s exact shapes with seeded random weights (a *shape* for measurements, not a model):
    2-D weights in `qtype`, norms in F32. Written tensor by tensor (a chunk of float32 rows at a time)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape

    qt = GGMLQuantizationType[qtype]
    tensors = _random_gguf_tensors(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    w = GGUFWriter(None, "llama")
    _add_llama_metadata(w, cfg, name)
    for tname, shape in tensors:
        if len(shape) == 1:
            w.add_tensor_info(tname, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, qt)
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for idx, (tname, shape) in enumerate(tensors):
        w.write_tensor_data(_random_weight(tname, shape, qt, np.random.default_rng([seed, idx]), rows_per_chunk))
    w.close()
    os.replace(tmp, path)
    return path

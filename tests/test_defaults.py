"""One source of defaults: the Python API and the Hydra configs (conf/) give the same settings, key by key and
value by value, for inference (InferConfig, evaluate, chat, serve) and for training (DistillModule,
DistillDataModule)."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dovetail_infer.chat import reply_config
from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.evaluate import EVAL_DEFAULTS, INFER_DEFAULTS, to_infer_config

CONF = ROOT / "conf"


def _yaml(path: str) -> dict:
    return yaml.safe_load((CONF / path).read_text())


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _compose(name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


# ---- inference --------------------------------------------------------------------------------------


def test_infer_defaults_are_infer_config_plus_evaluates_own():
    config = {k: v for k, v in dataclasses.asdict(InferConfig()).items() if k != "seed"}  # seed: the run's
    assert INFER_DEFAULTS == {**config, **EVAL_DEFAULTS}
    assert not set(config) & set(EVAL_DEFAULTS)
    # the engine a Python caller loads proposes from the same vocabulary as evaluate / chat / serve
    loader = _defaults(Dovetail.from_pretrained)
    assert loader["draft_vocab"] == EVAL_DEFAULTS["draft_vocab"] == 4096


def test_infer_yaml_restates_every_python_default():
    """conf/infer/default.yaml: the same keys with the same values (types included: 0.0 is not 0)."""
    conf = _yaml("infer/default.yaml")
    assert conf.keys() == INFER_DEFAULTS.keys(), set(conf) ^ set(INFER_DEFAULTS)
    differ = {
        k: (v, INFER_DEFAULTS[k])
        for k, v in conf.items()
        if (v, type(v)) != (INFER_DEFAULTS[k], type(INFER_DEFAULTS[k]))
    }
    assert not differ, differ


def test_hydra_and_python_build_the_same_infer_config():
    """What `evaluate.py` composes and what a Python caller gets from `InferConfig()` decode alike."""
    cfg = _compose("evaluate")
    assert to_infer_config(cfg["infer"], seed=cfg["seed"]) == InferConfig(seed=cfg["seed"])
    assert to_infer_config({}) == InferConfig()  # a partial dict falls back on the same defaults
    paper = _compose("evaluate", "infer=paper")["infer"]  # a preset changes only what it names
    names = {f.name for f in dataclasses.fields(InferConfig)}
    named = {k: v for k, v in _yaml("infer/paper.yaml").items() if k in names}
    assert to_infer_config(paper) == InferConfig(**named)


def test_serve_yaml_restates_server_settings():
    from dovetail_infer.serve import ServerSettings

    conf, python = _yaml("serve.yaml"), dataclasses.asdict(ServerSettings())
    server = conf["server"]
    assert set(server) == set(python) - {"max_tokens"}
    assert server.pop("model_name") is None  # null: named after the draft dir (python: a fixed fallback name)
    assert server == {k: python[k] for k in server}
    assert conf["max_tokens"] is python["max_tokens"] is _yaml("chat.yaml")["max_tokens"] is None  # InferConfig's


class _Engine:
    """Stands in for a loaded engine: Dovetail.stream builds its TextStream (and InferConfig) without a model."""

    target = SimpleNamespace(apply_chat_template=lambda messages: [1], eos_ids=[0])

    def check_prompt(self, prompt_ids: list[int], cfg: InferConfig) -> None:
        pass

    def decode_steps(self, prompt_ids: list[int], cfg: InferConfig):
        return iter(())


def _python_api(**kwargs) -> InferConfig:
    """The InferConfig `Dovetail.chat(messages, **kwargs)` decodes with (chat is stream, run to the end)."""
    return Dovetail.stream(_Engine(), [{"role": "user", "content": "Hi"}], **kwargs).cfg


def _served(cfg: dict, body: dict) -> InferConfig:
    """The InferConfig a request `body` decodes with on `python serve.py` of `cfg`: create_app(engine,
    reply_config(cfg), settings_from_config(cfg)) as run_server builds it."""
    from dovetail_infer.serve import parse_options, settings_from_config

    return parse_options(body, reply_config(cfg), settings_from_config(cfg).max_tokens).cfg


@pytest.mark.parametrize(
    ("overrides", "kwargs"),
    [
        ([], {}),
        (["max_tokens=64", "infer.temperature=0.7", "seed=3"], {"max_tokens": 64, "temperature": 0.7, "seed": 3}),
        (["infer.max_new_tokens=32"], {"max_tokens": 32}),
    ],
)
def test_chat_and_serve_decode_as_the_python_api(overrides, kwargs):
    """python chat.py, python serve.py with a request that sets nothing, and Dovetail.chat(messages): one InferConfig,
    by default and with the same settings given each way."""
    api = _python_api(**kwargs)
    for name in ("chat", "serve"):
        cfg = _compose(name, *overrides)
        assert reply_config(cfg) == api, name
        assert overrides or cfg["infer"] == INFER_DEFAULTS, name  # `infer: default`: InferConfig's values
    assert _served(_compose("serve", *overrides), {}) == api
    if not kwargs:
        assert api == InferConfig()
        python = _python_api(max_tokens=16, temperature=0.5, top_p=0.9, seed=7)
        body = {"max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "seed": 7}
        assert _served(_compose("serve"), body) == python  # a request's fields act as the Python arguments


# ---- training ---------------------------------------------------------------------------------------


def test_module_defaults_are_the_train_yaml_defaults():
    """Python-API users (DistillModule) and Hydra users (train.py) get the same recipe."""
    from dovetail_train.module import LOSS_DEFAULTS, OPTIM_DEFAULTS, DistillModule

    conf = _yaml("train.yaml")
    optim = {k: list(v) if isinstance(v, tuple) else v for k, v in OPTIM_DEFAULTS.items()}
    assert optim == conf["optim"]
    assert LOSS_DEFAULTS == conf["loss"]
    module = _defaults(DistillModule.__init__)
    for key in ("sim_tau_steps", "seed", "compile"):
        assert module[key] == conf[key], key


def test_datamodule_defaults_are_the_data_yaml_defaults():
    """DistillDataModule's keyword defaults are conf/data/default.yaml's (the data group's base), every key; the
    seed is train.yaml's."""
    from dovetail_train.data.datamodule import DistillDataModule

    conf, python = _yaml("data/default.yaml"), _defaults(DistillDataModule.__init__)
    params = set(inspect.signature(DistillDataModule.__init__).parameters) - {"self", "target", "seed"}
    assert set(conf) == params, set(conf) ^ params
    located = {"name", "path", "cache_dir"}  # where the data lives, not how it is used
    differ = {k: (conf[k], python[k]) for k in set(conf) - located if conf[k] != python[k]}
    assert not differ, differ
    assert python["seed"] == _yaml("train.yaml")["seed"]

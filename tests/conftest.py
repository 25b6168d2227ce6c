"""Shared fixtures: targets built from the same conf/target/*.yaml files users select."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dovetail_infer.models.target import Target, load_target, spec_from_yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = os.environ.get("DOVETAIL_CACHE", str(ROOT / "data" / "cache"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def target_spec(name: str, **overrides) -> dict:
    """The dict a user gets from `target=<name>`, with the cache dir resolved for tests."""
    return spec_from_yaml(ROOT / "conf" / "target" / f"{name}.yaml", CACHE, **overrides)


@contextmanager
def num_threads(n: int):
    """torch's thread count set to n inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and 2 spinning threads collapse on a busy 2-core machine.

    Use per module: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with num_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_target() -> Target:
    return load_target(target_spec("tiny_random"))


@pytest.fixture(scope="session")
def smollm2_target() -> Target:
    return load_target(target_spec("smollm2_135m", dtype="float32"))

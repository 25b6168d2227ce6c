"""The shipped draft (drafts/smollm2-135m-dovetail): loads against the embedded target, is lossless, gets accepted."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from dovetail_infer import Dovetail, InferConfig, load_draft

SHIPPED = ROOT / "drafts" / "smollm2-135m-dovetail"


def test_shipped_draft_is_complete_and_names_how_it_was_made():
    meta = json.loads((SHIPPED / "dovetail.json").read_text())
    assert meta["target"]["name"] == "smollm2_135m"
    assert meta["made_by"]["command"].startswith("python train.py experiment=shipped_draft")
    assert len(meta["made_by"]["commit"]) >= 7 and meta["made_by"]["weights_dtype"] == "bfloat16"
    assert (SHIPPED / "token_counts.safetensors").exists()


@pytest.mark.slow
def test_shipped_draft_is_accepted_and_lossless(smollm2_target):
    draft, _ = load_draft(SHIPPED, smollm2_target.identity())  # identity checked, weights finite
    assert draft.config.depth >= 1
    engine = Dovetail.from_pretrained(SHIPPED, smollm2_target, draft_device="cpu")
    ids = smollm2_target.apply_chat_template([{"role": "user", "content": "Explain what a CPU cache is."}])
    cfg = InferConfig(budget=15, depth=8, top_k=10, max_new_tokens=64, min_prob=0.0)  # the paper's tree
    spec, base = engine.generate(ids, cfg), engine.generate_baseline(ids, cfg)
    assert spec.output_ids == base.output_ids
    assert spec.tau >= 1.5, spec.tau  # an untrained draft gets ~1.0

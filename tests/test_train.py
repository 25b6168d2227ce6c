"""End-to-end training through the real entry point (`python train.py ...`) on the tiny random target."""

from __future__ import annotations

import json

import pytest
from helpers.train import metrics_rows, run_train

pytestmark = pytest.mark.slow  # train.py in a subprocess


def test_fast_dev_run_exports_a_draft_dir(tmp_path):
    proc = run_train("draft.depth=4", "debug=fdr", "compile=true", f"hydra.run.dir={tmp_path}")
    conf = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert conf["depth"] == 4 and conf["fusion"] == "dgf"
    meta = json.loads((tmp_path / "draft" / "dovetail.json").read_text())
    assert meta["target"]["name"] == "tiny_random"
    assert meta["summary"]["data"]["train_examples"] > 0
    assert f"exported draft: {tmp_path / 'draft'}" in proc.stdout
    assert (tmp_path / "draft" / "model.safetensors").stat().st_size > 0


def test_multirun_makes_one_dir_per_job(tmp_path):
    run_train("draft.depth=1,2", "debug=fdr", f"hydra.sweep.dir={tmp_path}", multirun=True)
    depths = sorted(json.loads(p.read_text())["depth"] for p in tmp_path.glob("*/draft/config.json"))
    assert depths == [1, 2]


def test_bad_key_and_value_fail_naming_the_key(tmp_path):
    proc = run_train("draft.dept=4", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "draft.dept" in proc.stderr
    proc = run_train("draft.depth=0", "debug=fdr", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "depth" in proc.stderr


def test_training_learns_and_resumes_from_checkpoint(tmp_path):
    common = [
        "data.limit=48",
        "data.max_new_tokens=24",
        "data.batch_size=8",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        f"hydra.run.dir={tmp_path}",
    ]
    run_train(*common, "trainer.max_steps=6", "trainer.max_epochs=-1", "trainer.val_check_interval=3")
    rows = metrics_rows(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    first = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    run_train(
        *common, "trainer.max_steps=12", "trainer.max_epochs=-1", "trainer.val_check_interval=3", "ckpt_path=last"
    )
    rows = metrics_rows(tmp_path)
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert max(steps) == 11 and min(steps) == 0, steps  # steps 0..5, then the resumed run's 6..11
    assert sorted(set(steps)) == list(range(12)), steps
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < first[0], (first, losses)
    meta = json.loads((tmp_path / "draft" / "dovetail.json").read_text())
    assert meta["summary"]["global_step"] == 12


def test_ddp_on_cpu_with_two_processes(tmp_path):
    run_train(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "trainer.precision=32-true",
        "data.limit=16",
        "data.max_new_tokens=12",
        "data.batch_size=4",
        "num_threads=1",
        f"hydra.run.dir={tmp_path}",
    )
    meta = json.loads((tmp_path / "draft" / "dovetail.json").read_text())
    assert meta["summary"]["global_step"] == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_online_features(tmp_path):
    run_train("data.features=online", "debug=fdr", f"hydra.run.dir={tmp_path}")
    assert (tmp_path / "draft" / "model.safetensors").exists()


def test_init_from_starts_from_an_exported_draft(tmp_path):
    """init_from loads the weights (with lr 0 the export is bitwise the start) and refuses another draft config."""
    from safetensors.torch import load_file

    run_train("debug=fdr", f"hydra.run.dir={tmp_path / 'a'}")
    src = tmp_path / "a" / "draft"
    proc = run_train("debug=fdr", "optim.lr=0.0", f"init_from={src}", f"hydra.run.dir={tmp_path / 'b'}")
    assert "initialised the draft from" in proc.stdout + proc.stderr
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "b" / "draft" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    proc = run_train("debug=fdr", "draft.depth=2", f"init_from={src}", f"hydra.run.dir={tmp_path / 'c'}", check=False)
    assert proc.returncode != 0 and "depth: 1 there vs 2 here" in proc.stderr


@pytest.mark.parametrize("positions", ["assistant", "all"])
def test_loss_positions_choose_the_counted_tokens(positions):
    """loss.positions=all counts every real next token in training (prompts too, never padding); validation keeps
    to assistant tokens either way, so val metrics stay comparable across the two."""
    import torch

    from dovetail_infer.models.draft import DraftConfig
    from dovetail_train.data.datamodule import collate
    from dovetail_train.module import DistillModule

    torch.manual_seed(0)
    D, V = 16, 32
    rows = [
        {
            "input_ids": torch.arange(1, 9),
            "loss_mask": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
            "hidden": torch.randn(8, D),
        },
        {"input_ids": torch.arange(1, 6), "loss_mask": torch.tensor([0, 0, 1, 1, 1]), "hidden": torch.randn(5, D)},
    ]
    batch = collate(rows)
    assert batch["valid_mask"].sum() == 13 and batch["loss_mask"].sum() == 7
    cfg = DraftConfig(hidden_size=D, intermediate_size=32, n_heads=2, n_kv_heads=2, vocab_size=V)
    m = DistillModule(cfg, torch.randn(V, D), torch.randn(V, D), loss={"positions": positions}, compile=False)
    m.sim_tau_steps = 0
    # shifted by one: 7 + 4 real next tokens, of which 4 + 3 are assistant tokens
    assert float(m.compute(batch, "train")["n_tokens"]) == (11 if positions == "all" else 7)
    assert float(m.compute(batch, "val")["n_tokens"]) == 7


def test_bad_loss_positions_is_refused():
    import torch

    from dovetail_infer.models.draft import DraftConfig
    from dovetail_train.module import DistillModule

    cfg = DraftConfig(hidden_size=16, intermediate_size=32, n_heads=2, n_kv_heads=2, vocab_size=32)
    with pytest.raises(ValueError, match="loss.positions must be 'assistant' or 'all', got 'prompt'"):
        DistillModule(cfg, torch.randn(32, 16), torch.randn(32, 16), loss={"positions": "prompt"}, compile=False)


def test_init_layers_from_target_copies_the_last_layers(tiny_target):
    """init_layers=target (a recipe lever that lost): draft layer i starts as the target's layer n - depth + i, the
    first layer's missing input norm skipped; a draft deeper than the target is refused."""
    import torch

    from dovetail_infer.models.draft import DraftConfig, DraftModel
    from dovetail_train.pipeline import init_layers_from_target

    model = tiny_target.model
    n = len(model.layers)
    draft = DraftModel(DraftConfig.from_target(model.config, depth=2))
    init_layers_from_target(draft, model)
    for i, layer in enumerate(draft.layers):
        src = model.layers[n - 2 + i].state_dict()
        for k, v in layer.state_dict().items():
            assert v.dtype == torch.float32 and v.equal(src[k].float()), k
    assert "input_layernorm.weight" not in draft.layers[0].state_dict()
    with pytest.raises(ValueError, match="only"):
        init_layers_from_target(DraftModel(DraftConfig.from_target(model.config, depth=n + 1)), model)


def test_init_config_is_checked():
    """A misspelt init_layers, or two starts at once, is refused instead of silently training from random init."""
    from dovetail_train.pipeline import check_init_config

    check_init_config(None, None)
    check_init_config("drafts/x", None)
    check_init_config(None, "target")
    with pytest.raises(ValueError, match="init_layers must be null or 'target', got 'targt'"):
        check_init_config(None, "targt")
    with pytest.raises(ValueError, match="both set: pick one start"):
        check_init_config("drafts/x", "target")

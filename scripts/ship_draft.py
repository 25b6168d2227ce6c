"""Copy a trained draft dir into drafts/<name>/ as the shipped draft: bf16 weights, and a dovetail.json that names
the command and commit that made it.

    python scripts/ship_draft.py logs/train/runs/<time>/draft --name smollm2-135m-dovetail \
        --command "python train.py experiment=shipped_draft" --commit <commit>
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dovetail_infer.checkpoint import CONFIG, COUNTS, META, WEIGHTS, check_finite, read_meta

ROOT = Path(__file__).resolve().parents[1]


def ship(src: Path, dst: Path, command: str, commit: str) -> Path:
    meta = read_meta(src)
    weights = load_file(src / WEIGHTS)
    check_finite(weights, str(src / WEIGHTS))
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, dst / WEIGHTS, {"format": "pt"})
    shutil.copyfile(src / CONFIG, dst / CONFIG)
    if (src / COUNTS).exists():
        shutil.copyfile(src / COUNTS, dst / COUNTS)
    meta["made_by"] = {"command": command, "commit": commit, "weights_dtype": "bfloat16"}
    (dst / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="an exported draft dir (a training run's draft/)")
    ap.add_argument("--name", default="smollm2-135m-dovetail")
    ap.add_argument("--command", required=True, help="the training command that made it")
    ap.add_argument("--commit", required=True, help="the commit it was trained at")
    args = ap.parse_args()
    print(ship(args.src, ROOT / "drafts" / args.name, args.command, args.commit))


if __name__ == "__main__":
    main()

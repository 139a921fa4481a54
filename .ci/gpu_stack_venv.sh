#!/usr/bin/env bash
# Builds (once) the virtualenv of the lent GPU machine's software stack: torch 2.11.0 + triton 3.6.0 +
# transformers 5.17.0. torch 2.11 exists on PyPI only as a CUDA build whose ~3 GB of nvidia libraries
# are needed even to import it on a CPU, so the venv lives in a fixed cache directory that later runs
# reuse; it is rebuilt when missing or when this file's pins change. Prints the venv's python.
set -euo pipefail
PINS='torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors>=0.4 tokenizers>=0.19 pytest>=8 pytest-benchmark>=4 jinja2>=3'
CACHE="${QWEN3_KERNELS_CI_CACHE:-$HOME/.cache/qwen3_kernels_ci}"
VENV="$CACHE/gpu-stack-venv"
STAMP="$VENV/.pins"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$PINS" ]; then
  # Built in place (a venv's scripts hard-code its path); the stamp is written last, so a run cut off
  # half-way leaves no stamp and the next run starts over.
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet $PINS >&2
  echo "$PINS" > "$STAMP"
fi
# Test-only packages, added to a built venv without rebuilding it (the torch download is the slow part).
EXTRAS='peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 matplotlib==3.11.2 tensorboard==2.21.0 tqdm==4.70.1'
EXTRAS_STAMP="$VENV/.extras"
if [ ! -f "$EXTRAS_STAMP" ] || [ "$(cat "$EXTRAS_STAMP")" != "$EXTRAS" ]; then
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet $EXTRAS >&2
  echo "$EXTRAS" > "$EXTRAS_STAMP"
fi
echo "$VENV/bin/python"

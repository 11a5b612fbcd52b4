#!/usr/bin/env bash
# Create benchmarks/.venv: torch 2.13.0 (CPU wheel) first, then the anchor eai-sparsify, then featuretree,
# then SAELens (interop.py, synthsae.py).
#
#     bash benchmarks/setup_env.sh
#
# Idempotent: rerunning reuses the venv and pip skips what is already installed. torch is installed on
# its own first so pip takes the local CPU wheel; later installs repeat the torch pin so no resolver
# can swap it for a newer (or CUDA) build. The script fails if torch is not 2.13.0+cpu at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="$here/.venv"
py="${PYTHON:-python3}"
torch_pin="torch==2.13.0"
sparsify_pin="eai-sparsify==1.3.3"
saelens_pin="sae-lens==6.54.12"  # interop.py and synthsae.py (SynthSAEBench generator and metrics)

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip_install() {  # quiet; drops the warnings about this machine's empty local index folders
    "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install "$torch_pin"
pip_install "$sparsify_pin" "$torch_pin"
pip_install -e "$repo" "$torch_pin"
pip_install "$saelens_pin" "$torch_pin"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md

import torch

assert torch.__version__ == "2.13.0+cpu", f"torch is {torch.__version__}, expected 2.13.0+cpu"
import featuretree  # noqa: F401
import sae_lens  # noqa: F401
import sparsify  # noqa: F401

print(f"benchmarks/.venv ready: torch {torch.__version__}, eai-sparsify {md.version('eai-sparsify')}, "
      f"featuretree {md.version('featuretree')}, sae-lens {md.version('sae-lens')}")
PY

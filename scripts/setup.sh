#!/usr/bin/env bash
# Create .venv and install addax_kernels with everything the tests and the benchmark use.
# torch is pinned to the local CPU wheel first, then the package is installed without build
# isolation and without dependency resolution, so pip never pulls a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install -q "torch==${ADDAX_TORCH_VERSION:-2.13.0}"
fi
$PIP install -q "triton==${ADDAX_TRITON_VERSION:-3.8.0}" numpy scipy pytest transformers peft matplotlib tqdm \
    pybind11 ninja "setuptools>=77" wheel
$PIP install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, addax_kernels as ak; print('torch', torch.__version__); print('backends on cpu:', ak.backend_report('cpu'))"

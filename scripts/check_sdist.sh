#!/usr/bin/env bash
# Build the sdist from this checkout and install it in a fresh venv the way a user would:
# torch pinned first (the local CPU wheel), then the sdist without build isolation and
# without dependency resolution, so pip never resolves a bare torch.  Checks that
#   1. the sdist builds the whole native extension: backend "native" is available on the
#      CPU, and CUDA kernels are in it exactly when the checkout's own build (.venv, made
#      by scripts/setup.sh on this machine) has them;
#   2. installed without the extension (ADDAX_KERNELS_NO_NATIVE=1), backend="auto" warns
#      once that it fell back to the reference backend, saying why and how to fix it.
# Needs .venv from scripts/setup.sh (it builds the sdist and knows what the checkout built).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/addax_sdist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The PEP 517 sdist hook that `python -m build --sdist --no-isolation` calls.
.venv/bin/python -c "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])" "$WORK/dist" >"$WORK/sdist.log" 2>&1 \
    || { cat "$WORK/sdist.log" >&2; exit 1; }
SDIST=$(ls "$WORK"/dist/addax_kernels-*.tar.gz)
echo "sdist: $(basename "$SDIST") ($(tar tzf "$SDIST" | grep -c '^addax_kernels-[^/]*/csrc/.*[^/]$') files under csrc/)"

"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q "torch==${ADDAX_TORCH_VERSION:-2.13.0}"
"$VPY" -m pip install -q numpy pybind11 "setuptools>=77" wheel
# A failed native build must fail this install, not leave a pure-Python package behind.
start=$SECONDS
ADDAX_KERNELS_REQUIRE_NATIVE=1 "$VPY" -m pip install -q --no-build-isolation --no-deps "$SDIST"
echo "sdist install with the native build: $((SECONDS - start)) s"

CHECKOUT_HAS_CUDA=$(.venv/bin/python -c "from addax_kernels.backends import native; print(int(native.build_info().get('cuda', False)))")
# Run outside the checkout so the installed copy is the one imported.
(cd "$WORK" && CHECKOUT_HAS_CUDA=$CHECKOUT_HAS_CUDA "$VPY" - "$ROOT") <<'EOF'
import os, sys
import addax_kernels as ak
from addax_kernels.backends import native

root = os.path.realpath(sys.argv[1])
assert not os.path.realpath(ak.__file__).startswith(root + os.sep), f"imported the checkout: {ak.__file__}"
report = ak.backend_report("cpu")
info = native.build_info()
print(f"installed {ak.__version__} at {os.path.dirname(ak.__file__)}; cpu backends: {report}; native build: {info}")
assert report["native"] == "available", report["native"]
expected_cuda = os.environ["CHECKOUT_HAS_CUDA"] == "1"
assert bool(info.get("cuda")) == expected_cuda, (
    f"the checkout's build has CUDA kernels: {expected_cuda}; the sdist's: {info.get('cuda')} ({info})")
EOF

ADDAX_KERNELS_NO_NATIVE=1 "$VPY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$SDIST"
(cd "$WORK" && "$VPY" -) <<'EOF'
import warnings
import torch
import addax_kernels as ak

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        ak.perturb_(torch.zeros(8), 1, 1e-3)
fallback = [w for w in caught if "fell back to the pure-PyTorch reference backend" in str(w.message)]
assert len(fallback) == 1, [str(w.message) for w in caught]
message = str(fallback[0].message)
print(f"without the extension: {fallback[0].category.__name__}: {message}")
for needed in ("native", "not built", "ADDAX_KERNELS_REQUIRE_NATIVE=1", "ADDAX_KERNELS_BACKEND=reference"):
    assert needed in message, f"the fallback warning does not say {needed!r}"
EOF
echo "sdist check passed"

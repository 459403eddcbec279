"""The CUDA kernels of csrc/cuda, compiled by the host compiler and run on the CPU.

No GPU has run the CUDA kernels in CI, so their logic — the chunk walk, the vector and masked
paths, the Rademacher warp tiles and their shuffles, launch splitting, device-resident seeds
and scalars — would otherwise meet its first test on the GPU.  This package builds a copy of
``addax_kernels._C`` from the same csrc/ in which

* ``<cuda_runtime.h>`` is ``cuda_runtime.h`` here: the CUDA keywords, device intrinsics, a
  one-device runtime and a launch that runs thread blocks in turn and a warp's 32 lanes as
  fibers that meet at each ``__shfl_sync`` (a shuffle some lanes never reach is a launch
  failure);
* ``csrc/cuda/ptx.cuh`` is ``ptx.cuh`` here: the inline PTX restated in C++;
* the one ``<<<grid, block, 0, stream>>>`` launch becomes a call of that launch.

Everything else of csrc/cuda and csrc/bindings.cpp compiles unchanged, so the tests drive it
through the native backend's own Python code (:mod:`cuda_emulation.backend`) on CPU tensors,
as device 0.  What it cannot check: the special-function unit's accuracy (libm stands in),
FMA contraction beyond the explicit ``__fmaf_rn`` (the host compiler contracts nothing),
memory-model and occupancy effects, and nvcc itself.  The build is cached under
``build/cuda-emulation/`` by the hash of its inputs.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD_ROOT = ROOT / "build" / "cuda-emulation"
MODULE_NAME = f"{__name__}._C"
MODULE_FILE = f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"

# The one kernel launch of csrc/cuda/fused_cuda.cu and what the emulation calls instead.
LAUNCH = "fused_kernel<K><<<grid, kThreads, 0, stream>>>(args);"
EMULATED_LAUNCH = "addax_emulation::launch(&fused_kernel<K>, grid, kThreads, 0, stream, args);"

# -O1: a quarter of -O3's compile time; the tests need the logic, not speed.  Alignment
# checks trap, as a misaligned vector access faults on the GPU.
_OPTIMIZATION = ["-O1", "-fsanitize=alignment", "-fsanitize-undefined-trap-on-error"]

_build_problem: Optional[str] = None
_module = None


def kernel_constant(name: str) -> int:
    """The value of ``constexpr ... name = <integer>;`` in csrc/cuda/fused_cuda.cu (kChunk, kTile, ...)."""
    match = re.search(rf"constexpr \w+ {name} = (\d+);", (CSRC / "cuda" / "fused_cuda.cu").read_text())
    if match is None:
        raise LookupError(f"csrc/cuda/fused_cuda.cu defines no integer constant {name}")
    return int(match.group(1))


def _compiler() -> Optional[str]:
    configured = (sysconfig.get_config_var("CXX") or "g++").split()[0]
    return shutil.which(configured) or shutil.which("g++")


def _required_compiler() -> str:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    return compiler


def _run_compiler(command) -> None:
    """Runs one compile or link; a failure raises with the command and the end of its errors."""
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(str(part) for part in command)}\n{result.stderr[-4000:]}")


def missing_toolchain() -> Optional[str]:
    """What the emulation build lacks on this machine (a reason to skip), or None.  A build that
    fails with everything present is a test error, not a skip."""
    if sys.platform != "linux":
        return "Linux (ucontext fibers, fcntl locks)"
    if _compiler() is None:
        return "a C++ compiler (g++)"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11"
    return None


def _inputs():
    """Every file the build reads, in a fixed order."""
    files = sorted(path for path in CSRC.rglob("*") if path.suffix in (".h", ".cuh", ".cu", ".cpp", ".py"))
    return files + sorted(HERE.glob("*.h")) + sorted(HERE.glob("*.cuh"))


def _flags():
    build_flags = runpy.run_path(str(CSRC / "build_flags.py"))
    return [flag for flag in build_flags["CXX_FLAGS"] if not flag.startswith("-O")] + _OPTIMIZATION


def _build_key(compiler: str) -> str:
    import pybind11

    digest = hashlib.sha256()
    for path in _inputs():
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    digest.update(" ".join([compiler, sys.version, pybind11.__version__, *_flags()]).encode())
    return digest.hexdigest()[:16]


def _prepare_sources(source_dir: Path) -> None:
    """csrc/ copied to ``source_dir`` with the PTX header and the launch replaced."""
    shutil.copytree(CSRC, source_dir)
    shutil.copyfile(HERE / "ptx.cuh", source_dir / "cuda" / "ptx.cuh")
    kernel_file = source_dir / "cuda" / "fused_cuda.cu"
    text = kernel_file.read_text()
    if text.count("<<<") != 1 or text.count(LAUNCH) != 1:
        raise RuntimeError(f"csrc/cuda/fused_cuda.cu no longer has exactly one launch `{LAUNCH}`: "
                           "update tests/cuda_emulation/__init__.py")
    kernel_file.write_text(text.replace(LAUNCH, EMULATED_LAUNCH))


def _compile(compiler: str, work: Path) -> Path:
    import pybind11

    source_dir = work / "csrc"
    _prepare_sources(source_dir)
    include = [f"-I{HERE}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    common = [*_flags(), "-fPIC", "-DADDAX_WITH_CUDA=1", '-DADDAX_CUDA_ARCHS="cpu-emulation"',
              '-DADDAX_CUDA_BUILD_NOTE="the CPU emulation of the CUDA kernels"', "-DADDAX_BASELINE_ONLY=1", *include]
    units = {
        "bindings.o": ["-c", str(source_dir / "bindings.cpp")],
        "fused_cpu.o": ["-c", str(source_dir / "cpu" / "fused_cpu.cpp")],
        "tile_kernels.o": ["-DADDAX_TILE_ISA=baseline", "-c", str(source_dir / "cpu" / "tile_kernels.cpp")],
        "fused_cuda.o": ["-x", "c++", "-c", str(source_dir / "cuda" / "fused_cuda.cu")],
    }

    def compile_unit(item):
        name, arguments = item
        _run_compiler([compiler, *common, *arguments, "-o", work / name])
        return work / name

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        objects = list(pool.map(compile_unit, units.items()))
    target = work / MODULE_FILE
    _run_compiler([compiler, "-shared", "-fopenmp", *_OPTIMIZATION, *objects, "-o", target])
    return target


def compile_program(name: str, directory: Path) -> Path:
    """``<name>.cu`` of this folder built as a program in ``directory``, against the stand-in
    runtime and the emulation's copy of csrc/cuda (so it can include device_math.cuh)."""
    kernels = _built_module_path().parent / "csrc" / "cuda"
    target = directory / name
    # -O2 after the build's -O1: the transform check evaluates 2^25 transforms per run.
    _run_compiler([_required_compiler(), *_flags(), "-O2", f"-I{HERE}", f"-I{kernels}", "-x", "c++",
                   HERE / f"{name}.cu", "-x", "none", "-o", target])
    return target


def _built_module_path() -> Path:
    compiler = _required_compiler()
    directory = BUILD_ROOT / _build_key(compiler)
    target = directory / MODULE_FILE
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    with open(BUILD_ROOT / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (pytest-xdist workers)
        if not target.exists():
            work = directory.with_name(directory.name + ".partial")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            _compile(compiler, work)
            shutil.rmtree(directory, ignore_errors=True)
            work.rename(directory)
            for stale in BUILD_ROOT.iterdir():  # builds of other sources: one build is kept
                if stale.is_dir() and stale != directory:
                    shutil.rmtree(stale, ignore_errors=True)
    return target


def load():
    """The emulated extension module (built on first use); raises RuntimeError if it cannot be built."""
    global _module, _build_problem
    if _module is not None:
        return _module
    if _build_problem is not None:
        raise RuntimeError(_build_problem)
    try:
        path = _built_module_path()
        spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:
        _build_problem = f"the CPU emulation of the CUDA kernels could not be built: {error}"
        raise RuntimeError(_build_problem) from error
    _module = module
    return module

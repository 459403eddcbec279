"""Build script: the Python package plus the optional native extension ``addax_kernels._C``.

The extension is pybind11 + raw pointers (no torch C++ API), so it builds against any torch
and works with any torch of the supported range.  The CUDA kernels are compiled here with
nvcc and linked with the static CUDA runtime, so the build needs no CUDA-enabled torch and
the result does not depend on the CUDA version torch was built with.

Environment switches (see docs/native.md):

* ``ADDAX_KERNELS_NO_NATIVE=1``   install the pure-Python package only.
* ``ADDAX_KERNELS_NO_CUDA=1``     build the CPU kernels only.
* ``ADDAX_KERNELS_CUDA_ARCHS``    nvcc targets, default ``sm_80;sm_90a;compute_90``
                                  (``sm_XX`` = machine code, ``compute_XX`` = PTX for later GPUs).
* ``CUDA_HOME`` / ``CUDA_PATH``   the CUDA toolkit (default: nvcc on PATH, then /usr/local/cuda).
* ``MAX_JOBS``                    parallel compiler jobs (default: number of CPUs).
* ``ADDAX_KERNELS_REQUIRE_NATIVE=1``  fail the install if the extension does not build
                                  (default: warn and install without it).
"""

from __future__ import annotations

import os
import platform
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
# The compiler flags live in csrc/build_flags.py (also read by `python -m addax_kernels sass`).
_BUILD_FLAGS = runpy.run_path(os.path.join(ROOT, CSRC, "build_flags.py"))
CXX_FLAGS = _BUILD_FLAGS["CXX_FLAGS"]
TILE_ISA_FLAGS = _BUILD_FLAGS["TILE_ISA_FLAGS"]
NVCC_FLAGS = _BUILD_FLAGS["NVCC_FLAGS"]
DEFAULT_CUDA_ARCHS = _BUILD_FLAGS["DEFAULT_CUDA_ARCHS"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _max_jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def _log(message: str) -> None:
    print(f"addax_kernels: {message}", file=sys.stderr, flush=True)


def _cudart_static_dir(cuda_home: str):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(cuda_home, sub, "libcudart_static.a")):
            return os.path.join(cuda_home, sub)
    return None


def _find_cuda_home():
    """A CUDA toolkit with nvcc and the static runtime, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script outside the toolkit: only a hint
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and _cudart_static_dir(home):
            return home
    return None


def _gencode_flags(spec: str):
    """``sm_80;sm_90a;compute_90`` -> nvcc -gencode flags (SASS for sm_*, PTX for compute_*)."""
    flags, names = [], []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        match = re.fullmatch(r"(sm|compute)_(\d+[af]?)", token)
        if not match:
            raise ValueError(
                f"ADDAX_KERNELS_CUDA_ARCHS entry {token!r} is not sm_XX[a] (machine code) or compute_XX (PTX)"
            )
        kind, arch = match.groups()
        code = f"sm_{arch}" if kind == "sm" else f"compute_{arch}"
        flags += ["-gencode", f"arch=compute_{arch},code={code}"]
        names.append(token)
    if not flags:
        raise ValueError("ADDAX_KERNELS_CUDA_ARCHS names no architecture")
    return flags, names


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "/").replace('"', "'") + '"'


class OptionalNativeBuild(build_ext):
    """Builds ``addax_kernels._C`` if it can; a failure leaves a working pure-Python install."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # compiler missing, toolchain broken, ...
            if _flag("ADDAX_KERNELS_REQUIRE_NATIVE"):
                raise
            _log(f"the native extension was not built ({type(error).__name__}: {error}); "
                 "the reference and Triton backends still work")

    def build_extension(self, ext):
        if ext.name == HOST_EXTENSION:
            _build_host_extension(self, ext)
            return
        with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
            cuda = pool.submit(self._add_cuda, ext)
            tiles = self._compile_tile_kernels(ext, pool)
            cuda_note = cuda.result()
        ext.extra_objects += tiles
        ext.define_macros.append(("ADDAX_CUDA_BUILD_NOTE", _c_string(cuda_note)))
        # distutils rebuilds by timestamps of sources and `depends` only: a stamp of the macros
        # recompiles the sources when the configuration changes (e.g. a CPU-only build followed
        # by a CUDA build in place), and the prebuilt objects relink the module when they change.
        ext.depends += [self._configuration_stamp(ext)] + list(ext.extra_objects)
        self._compile_cxx_in_parallel(ext)
        super().build_extension(ext)

    def _configuration_stamp(self, ext) -> str:
        """A file whose content is the extension's macros, rewritten only when they change."""
        os.makedirs(self.build_temp, exist_ok=True)
        path = os.path.join(self.build_temp, "addax_native_configuration.txt")
        content = "\n".join(f"{name}={value}" for name, value in ext.define_macros) + "\n"
        try:
            with open(path) as handle:
                unchanged = handle.read() == content
        except OSError:
            unchanged = False
        if not unchanged:
            with open(path, "w") as handle:
                handle.write(content)
        return path

    def _compile_tile_kernels(self, ext, pool):
        """csrc/cpu/tile_kernels.cpp once per instruction set (x86-64), else once."""
        source = os.path.join(CSRC, "cpu", "tile_kernels.cpp")
        if platform.machine().lower() in ("x86_64", "amd64"):
            variants = TILE_ISA_FLAGS
        else:
            variants = {"baseline": []}
            ext.define_macros.append(("ADDAX_BASELINE_ONLY", "1"))

        def compile_variant(isa):
            return self.compiler.compile(
                [source],
                output_dir=os.path.join(self.build_temp, f"tile_{isa}"),
                macros=[("ADDAX_TILE_ISA", isa)],
                include_dirs=ext.include_dirs,
                extra_postargs=CXX_FLAGS + variants[isa],
                depends=ext.depends,
            )

        futures = [pool.submit(compile_variant, isa) for isa in variants]
        return [obj for future in futures for obj in future.result()]

    def _compile_cxx_in_parallel(self, ext):
        # distutils compiles one source at a time; MAX_JOBS threads run the compilers at once
        # and the base class then finds the objects up to date.
        original_compile = self.compiler.compile

        def compile_parallel(sources, *args, **kwargs):
            with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
                results = list(pool.map(lambda source: original_compile([source], *args, **kwargs), sources))
            return [obj for objects in results for obj in objects]

        self.compiler.compile = compile_parallel

    def _add_cuda(self, ext) -> str:
        """Compile csrc/cuda/*.cu with nvcc into ``ext``; returns a note for unavailable_reason."""
        if _flag("ADDAX_KERNELS_NO_CUDA"):
            _log("ADDAX_KERNELS_NO_CUDA=1: building the CPU kernels only")
            return "built without CUDA: ADDAX_KERNELS_NO_CUDA=1 was set"
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            _log("no CUDA toolkit with nvcc and libcudart_static.a found (set CUDA_HOME): building the CPU kernels only")
            return "built without CUDA: nvcc was not found at build time (set CUDA_HOME and rebuild)"
        try:
            gencode, arch_names = _gencode_flags(os.environ.get("ADDAX_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
            objects = self._nvcc(cuda_home, gencode)
        except (OSError, ValueError, subprocess.CalledProcessError) as error:
            if _flag("ADDAX_KERNELS_REQUIRE_NATIVE"):
                raise
            _log(f"CUDA kernels not built ({error}); building the CPU kernels only")
            return f"built without CUDA: nvcc failed at build time ({type(error).__name__})"
        library_dir = _cudart_static_dir(cuda_home)
        ext.extra_objects += objects
        ext.library_dirs.append(library_dir)
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext.define_macros += [("ADDAX_WITH_CUDA", "1"), ("ADDAX_CUDA_ARCHS", _c_string(" ".join(arch_names)))]
        return ""

    def _nvcc(self, cuda_home: str, gencode):
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        sources = sorted(
            os.path.join(CSRC, "cuda", name) for name in os.listdir(os.path.join(ROOT, CSRC, "cuda")) if name.endswith(".cu")
        )
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cuda"))
        os.makedirs(build_dir, exist_ok=True)
        host_compiler = sysconfig.get_config_var("CXX") or "g++"
        host_compiler = shutil.which(host_compiler.split()[0]) or "g++"
        threads = str(_max_jobs())

        # What a .cu object depends on besides its source: the headers it includes and the flags.
        headers = [os.path.join(ROOT, CSRC, name) for name in ("fused_job.h", "philox.h", "build_flags.py")]
        headers += [os.path.join(ROOT, CSRC, "cuda", name) for name in os.listdir(os.path.join(ROOT, CSRC, "cuda"))
                    if name.endswith((".h", ".cuh"))]

        def compile_one(source):
            target = os.path.join(build_dir, os.path.basename(source) + ".o")
            command = [nvcc, *NVCC_FLAGS, *gencode, "-ccbin", host_compiler, "-c", source, "-o", target]
            recorded = target + ".command"
            inputs = [os.path.join(ROOT, source)] + headers
            try:
                with open(recorded) as handle:
                    same_command = handle.read() == " ".join(command)
                up_to_date = same_command and os.path.getmtime(target) >= max(map(os.path.getmtime, inputs))
            except OSError:
                up_to_date = False
            if up_to_date and not self.force:
                _log(f"{source} is up to date")
                return target
            _log(" ".join(command))
            subprocess.run(command[:1] + ["--threads", threads] + command[1:], check=True, cwd=ROOT)
            with open(recorded, "w") as handle:
                handle.write(" ".join(command))
            return target

        with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
            return list(pool.map(compile_one, sources))


def _extensions():
    if _flag("ADDAX_KERNELS_NO_NATIVE"):
        _log("ADDAX_KERNELS_NO_NATIVE=1: installing without the native extension")
        return []
    try:
        import pybind11
    except ImportError:
        if _flag("ADDAX_KERNELS_REQUIRE_NATIVE"):
            raise RuntimeError("ADDAX_KERNELS_REQUIRE_NATIVE=1 but pybind11 is not installed: pip install pybind11")
        _log("pybind11 is not installed: installing without the native extension")
        return []
    return [
        Extension(
            "addax_kernels._C",
            sources=[os.path.join(CSRC, "bindings.cpp"), os.path.join(CSRC, "cpu", "fused_cpu.cpp")],
            include_dirs=[pybind11.get_include()],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
            depends=[
                os.path.join(CSRC, name)
                for name in ("philox.h", "fused_job.h", "build_flags.py", "cpu/fused_cpu.h", "cpu/tile_kernels.h",
                             "cpu/simd_lanes.h", "cuda/fused_cuda.h", "cuda/device_math.cuh", "cuda/ptx.cuh")
            ],
            language="c++",
        )
    ]


HOST_EXTENSION = "addax_kernels._host"


def _host_extension():
    """``addax_kernels._host``: the ops' per-call host work (csrc/host/), linked against the
    installed torch, so it needs torch at build time (``pip install --no-build-isolation``).
    Optional like ``_C``: without it the ops check their tensors in Python (milliseconds of host
    time per call on hundreds of tensors instead of tens of microseconds)."""
    if _flag("ADDAX_KERNELS_NO_NATIVE"):
        return []
    try:
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError as error:
        if _flag("ADDAX_KERNELS_REQUIRE_NATIVE"):
            raise
        _log(f"torch is not importable at build time ({error}): installing without {HOST_EXTENSION} "
             "(build with --no-build-isolation to include it)")
        return []
    return [
        Extension(
            HOST_EXTENSION,
            sources=[os.path.join(CSRC, "host", "host.cpp")],
            include_dirs=include_paths(),
            library_dirs=library_paths(),
            libraries=["c10", "torch", "torch_cpu", "torch_python"],
            # torch 2.13's headers need C++20; the ABI flag must match the one torch was built with.
            extra_compile_args=["-std=c++20", "-O2", "-g0", "-fvisibility=hidden",
                                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"],
            language="c++",
        )
    ]


def _build_host_extension(command: build_ext, ext) -> None:
    """Build ``_host`` on its own: a failure is reported and leaves the other extensions alone,
    unless ADDAX_KERNELS_REQUIRE_NATIVE=1."""
    try:
        build_ext.build_extension(command, ext)
    except Exception as error:  # compiler missing, headers of an unsupported torch, ...
        if _flag("ADDAX_KERNELS_REQUIRE_NATIVE"):
            raise
        # Rebound, not mutated: the loop building the extensions goes on over the old list,
        # while copying in place and listing outputs skip the extension that was not built.
        command.extensions = [other for other in command.extensions if other is not ext]
        _log(f"{HOST_EXTENSION} was not built ({type(error).__name__}: {error}); the ops check their "
             "tensors in Python instead (milliseconds of host time per call on hundreds of tensors)")


setup(ext_modules=_host_extension() + _extensions(), cmdclass={"build_ext": OptionalNativeBuild})

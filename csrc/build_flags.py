"""Compiler flags of the native extension ``addax_kernels._C``: the one home of them.

setup.py loads this file by path (the package need not be importable at build time), and
``python -m addax_kernels sass`` compiles the CUDA kernels with the same NVCC_FLAGS to count
their instructions.
"""

CXX_FLAGS = [
    "-std=c++17",
    "-O3",
    "-g0",
    "-fopenmp",
    # The CPU kernels round every product and sum like the reference backend: no FMA contraction.
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fvisibility=hidden",
]

# The CPU tile kernel is compiled once per instruction set and chosen at run time (csrc/cpu/).
TILE_ISA_FLAGS = {
    # -Wno-maybe-uninitialized: GCC 12 flags _mm512_undefined_epi32 inside its own intrinsics.
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mprefer-vector-width=512",
               "-Wno-maybe-uninitialized"],
    "avx2": ["-mavx2"],
    "baseline": [],
}

# nvcc contracts a * b + c into FMA in device code (its default): SPEC §4 lets the GPU updates
# differ from the float32 reference by a few ulps, and the kernels' instruction budget needs the
# fused ops.  The host compiler must not contract: the coefficients computed on the host
# (make_coefficients) must equal, bit for bit, those the kernels compute with __fmul_rn/__fadd_rn
# (GCC contracts by default where the target has FMA, e.g. aarch64).
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
              "-Xcompiler", "-ffp-contract=off"]

# nvcc targets: sm_XX[a] = machine code, compute_XX = PTX the driver compiles for newer GPUs.
DEFAULT_CUDA_ARCHS = "sm_80;sm_90a;compute_90"

# The architecture the offline SASS report compiles for (H200).
SASS_REPORT_ARCH = "sm_90a"

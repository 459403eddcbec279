"""Independent references shared by the test files: published vectors and SPEC formulas in plain
Python (ints and float64), written from the SPEC text without addax_kernels' helpers, so a shared
mistake cannot pass."""

import math

# Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors):
# (counter, key, words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def python_philox(counter, key):
    """Philox4x32-10 with Python ints, straight from Salmon et al. (2011)."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [
            ((p1 >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF,
            p1 & 0xFFFFFFFF,
            ((p0 >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF,
            p0 & 0xFFFFFFFF,
        ]
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return tuple(c)


def spec_words(seed: int, tid: int, element: int, purpose: int):
    """The four words of the Philox block holding ``element`` (Gaussian / rounding / mask layout)."""
    block = element >> 2
    return python_philox((block & 0xFFFFFFFF, block >> 32, tid, purpose), (seed & 0xFFFFFFFF, seed >> 32))


def spec_gaussian_float64(words):
    """Box–Muller of SPEC §1 in float64 from four words (Python ints)."""
    u = [(2 * (w >> 9) + 1) * 2.0**-24 for w in words]
    r0 = math.sqrt(-2.0 * math.log(u[0]))
    r1 = math.sqrt(-2.0 * math.log(u[2]))
    return [
        r0 * math.cos(2 * math.pi * u[1]),
        r0 * math.sin(2 * math.pi * u[1]),
        r1 * math.cos(2 * math.pi * u[3]),
        r1 * math.sin(2 * math.pi * u[3]),
    ]


def spec_kept(seed: int, tid: int, element: int, sparsity: float) -> bool:
    """SPEC §1 sparsity: element kept iff u_{e & 3} of its purpose-2 word is >= p (exact in float64)."""
    word = spec_words(seed, tid, element, 2)[element & 3]
    return (2 * (word >> 9) + 1) * 2.0**-24 >= sparsity

"""Command line: ``python -m addax_kernels <command> [options]`` (also ``addax-kernels <command>``)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {
    "bench": "kernels vs copy roofline and baselines, host time, ZO-Bench updates, full steps (see --help)",
    "sass": "count SASS instructions per element of the GPU kernels for an H200, offline (see --help)",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m addax_kernels <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(rest)
    if command == "sass":
        from .sass import main as sass_main

        return sass_main(rest)
    print(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Throughput plot: GB/s against size, one panel per (dtype, op), with the copy roofline."""

from __future__ import annotations

from typing import List


def plot_throughput(results: dict, path: str) -> None:
    """Write a PNG of kernel throughput; needs matplotlib (drawn with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels, mezo, copies = results["kernels"], results["mezo"], results["copy"]
    ops: List[str] = list(dict.fromkeys(r["op"] for r in mezo))
    dtypes: List[str] = list(dict.fromkeys(r["dtype"] for r in mezo))
    backends: List[str] = list(dict.fromkeys(r["backend"] for r in kernels))
    if not ops:
        raise ValueError("no kernel results to plot")

    figure, axes = plt.subplots(
        len(dtypes), len(ops), figsize=(4.2 * len(ops), 3.2 * len(dtypes)), squeeze=False, sharex=True
    )
    copy_by_bytes = {(r["dtype"], r["bytes"]): r["gbps"] for r in copies}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, dtype in enumerate(dtypes):
        for column, op in enumerate(ops):
            ax = axes[row][column]
            baseline = sorted((r for r in mezo if r["op"] == op and r["dtype"] == dtype), key=lambda r: r["numel"])
            sizes = [r["numel"] for r in baseline]
            roofline = [copy_by_bytes.get((dtype, r["bytes_moved"])) for r in baseline]
            ax.plot(sizes, roofline, "k:", label="copy (same bytes)")
            for index, backend in enumerate(backends):
                points = sorted(
                    (r for r in kernels if r["backend"] == backend and r["op"] == op and r["dtype"] == dtype),
                    key=lambda r: r["numel"],
                )
                ax.plot([r["numel"] for r in points], [r["gbps"] for r in points], "o-",
                        color=colors[index % len(colors)], label=backend)
            ax.plot(sizes, [r["gbps"] for r in baseline], "s--", color="gray", label="MeZO-style")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op} {dtype}", fontsize=10)
            ax.minorticks_off()  # a log axis spanning decades draws hundreds of minor ticks
            ax.grid(True, alpha=0.3)
            if column == 0:
                ax.set_ylabel("GB/s (bytes moved / time)")
            if row == len(dtypes) - 1:
                ax.set_xlabel("elements")
    axes[0][0].legend(fontsize=8)
    env = results["environment"]
    figure.suptitle(f"addax_kernels on {env['device_name']} (torch {env['versions']['torch']})", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

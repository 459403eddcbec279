"""Throughput plot: GB/s against size, one panel per (dtype, op), with the copy roofline."""

from __future__ import annotations


def plot_throughput(results: dict, path: str) -> None:
    """Write a PNG of the ``tensor`` case; needs matplotlib (drawn with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["kernels"] if r["case"] == "tensor" and "error" not in r]
    if not records:
        raise ValueError("no kernel results to plot")
    ops = list(dict.fromkeys(r["op"] for r in records))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    copies = {(r["dtype"], r["bytes"]): r["gbps"] for r in results["copy"]}
    figure, axes = plt.subplots(len(dtypes), len(ops), figsize=(4.2 * len(ops), 3.2 * len(dtypes)), squeeze=False,
                                sharex=True)
    for row, dtype in enumerate(dtypes):
        for column, op in enumerate(ops):
            ax = axes[row][column]
            panel = sorted((r for r in records if r["op"] == op and r["dtype"] == dtype), key=lambda r: r["numel"])
            sizes = sorted({r["numel"] for r in panel})
            by_size = {r["numel"]: r["bytes"] for r in panel}
            ax.plot(sizes, [copies.get((dtype, by_size[n])) for n in sizes], "k:", label="copy (same bytes)")
            for index, impl in enumerate(impls):
                points = [r for r in panel if r["impl"] == impl]
                style = "o-" if impl in ("triton", "native", "reference") else "s--"
                ax.plot([r["numel"] for r in points], [r["gbps"] for r in points], style, color=f"C{index}",
                        label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.minorticks_off()  # a log axis over decades draws hundreds of minor ticks
            ax.set_title(f"{op} {dtype}", fontsize=10)
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

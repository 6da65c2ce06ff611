"""The printed table (a header naming the set-up, one row per config, a legend) and the bar chart of the speedups."""

# The legend's note on the float32 CUDA peak's precision (report["matmul_tf32"]; None: not float32 on CUDA).
PEAK_PRECISION = {True: ", in TF32 as the convs", False: ", in true float32 as the convs", None: ""}
TABLE_COLUMNS = (
    ("config", "label", "{}"),
    ("train ms", "train_ms", "{:.2f}"),
    ("speedup", "train_speedup", "{:.2f}x"),
    ("infer ms", "infer_ms", "{:.2f}"),
    ("speedup", "infer_speedup", "{:.2f}x"),
    ("train TF/s", "train_tflops", "{:.2f}"),
    ("of peak", "train_peak_fraction", "{:.0%}"),
    ("train MiB", "train_peak_mib", "{:.0f}"),
    ("infer MiB", "infer_peak_mib", "{:.0f}"),
    ("out err", "out_rel_err", "{:.1e}"),
    ("grad err", "grad_rel_err", "{:.1e}"),
    ("infer err", "infer_rel_err", "{:.1e}"),
)


def table_rows(report):
    """The table's cells: the column titles, then one row per config (label and reason for a skipped one)."""
    rows = [[title for title, _, _ in TABLE_COLUMNS]]
    for result in report["configs"]:
        if "skipped" in result:
            rows.append([result["label"], result["skipped"]])
        else:
            rows.append([fmt.format(result[key]) if result.get(key) is not None else "n/a"
                         for _, key, fmt in TABLE_COLUMNS])
    return rows


def table_header(report):
    """The two lines above the table naming the device, software and input, and a blank line."""
    hardware = report["device_name"] if report["cuda"] else f"{report['device_name']}, {report['cpu_threads']} threads"
    return [
        f"device: {report['device']} ({hardware}) | torch {report['torch']} | "
        f"triton {report['triton'] or 'not installed'} | fused ops backend: {report['fused_ops_backend']}"
        f"{' | TF32 convs' if report['tf32_convs'] else ''} | double blocks' second conv: {report['second_conv']}"
        + (f" (picks: {report['second_conv_picks']})" if report.get("second_conv_picks") else ""),
        f"input: {' x '.join(map(str, report['shape']))}, {report['dtype']}"
        f"{', channels_last' if report['channels_last'] else ''} | timing: median of {report['reps']} reps "
        f"after {report['warmup']} warm-up, {report['batches']} rotating random batches",
        "",
    ]


def table_legend(report):
    """The lines below the table: a blank line, what each column means, and the first calls' times."""
    return [
        "",
        f"TF/s: the reference's model FLOPs of a training step ({report['train_gflop']:.0f} GFLOP) per second; "
        f"of peak: against the measured {report['dtype']} matmul peak of this device "
        f"({report['matmul_peak_tflops']:.1f} TF/s{PEAK_PRECISION[report.get('matmul_tf32')]}).",
        "speedup: over reference eager. MiB: peak memory of one step above the weights and inputs held "
        f"before it ({report['memory_method']}).",
        "err: ||x - x64|| / ||x64|| against a float64 training step of the reference on the same weights and "
        "input; grad err is the worst parameter's (conv biases feeding a BatchNorm left out: BN cancels them); "
        "infer err: the eval-mode output's, against a float64 inference.",
        "first calls, s (train / infer; compilation, export, autotuning, lazy set-up): " + ", ".join(
            f"{r['label']} {'n/a' if r['first_train_s'] is None else format(r['first_train_s'], '.1f')} / "
            f"{r['first_infer_s']:.1f}" for r in report["configs"] if "skipped" not in r
        ),
    ]


def format_table(report):
    """The side-by-side table with a header naming the set-up and a legend."""
    rows = table_rows(report)
    full_rows = [row for row in rows if len(row) == len(TABLE_COLUMNS)]
    widths = [max(len(row[i]) for row in full_rows) for i in range(len(TABLE_COLUMNS))]
    lines = table_header(report)
    for row in rows:
        if len(row) == len(TABLE_COLUMNS):
            cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells))
        else:
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
    return "\n".join(lines + table_legend(report))


def plot_speedups(report, path):
    """Bar chart of the training and inference speedups over reference eager, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [result for result in report["configs"] if "skipped" not in result]
    positions = range(len(measured))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(measured)), 4.6))
    phases = ((-width / 2, "train_speedup", "training step"), (width / 2, "infer_speedup", "inference"))
    for offset, key, name in phases:
        values = [r.get(key, float("nan")) for r in measured]  # nan: no bar (a row without a training step)
        bars = ax.bar([p + offset for p in positions], values, width, label=name)
        ax.bar_label(bars, labels=["" if v != v else f"{v:.2f}x" for v in values])
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(positions), [result["label"] for result in measured], rotation=20, ha="right")
    ax.set_ylabel("speedup over reference eager")
    ax.set_title(f"U-Net {' x '.join(map(str, report['shape']))} {report['dtype']} on {report['device_name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

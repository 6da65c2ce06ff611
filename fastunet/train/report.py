"""What a run ends with: history.json, the loss plot (loss.png) and the table of final losses, Dice and IoU."""

import json

from .loop import log


def moving_average(values, window):
    """Trailing mean over ``window`` values: (x positions 1-based, means), ``len(values) - window + 1`` of each."""
    cumulative = [0.0]
    for value in values:
        cumulative.append(cumulative[-1] + value)
    means = [(cumulative[i] - cumulative[i - window]) / window for i in range(window, len(values) + 1)]
    return list(range(window, len(values) + 1)), means


def plot_losses(histories, path, title):
    """PNG of the per-step training losses, one panel per model (shared y axis), each with its moving average
    (and, with several models, the others' moving averages dashed), final loss, Dice and IoU in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(histories)
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        history = histories[name]
        losses = history["losses"]
        window = max(1, round(len(losses) / 10))
        ax.plot(range(1, len(losses) + 1), losses, color=colours[name], alpha=0.35, linewidth=0.8, label="per step")
        ax.plot(*moving_average(losses, window), color=colours[name], linewidth=2,
                label=f"{name}, mean of {window} steps")
        for other in names:
            if other != name:
                ax.plot(*moving_average(histories[other]["losses"], window), color=colours[other], linewidth=1.2,
                        linestyle="--", label=f"{other}, mean of {window} steps")
        last = history["epochs"][-1]
        metrics = f", Dice {last['dice']:.3f}, IoU {last['iou']:.3f}" if last["dice"] is not None else ""
        ax.set_title(f"{name}: final loss {history['final_loss']:.4f}{metrics}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(histories, comparison=None):
    """Final loss (mean of the last k steps), Dice, IoU and seconds per step of each model; the gap line."""
    lines = [f"{'model':<10} {'final loss':>10} {'Dice':>7} {'IoU':>7} {'s/step':>7}"]
    for name, history in histories.items():
        last = history["epochs"][-1]
        dice, iou = (f"{last[key]:.4f}" if last[key] is not None else "n/a" for key in ("dice", "iou"))
        lines.append(f"{name:<10} {history['final_loss']:>10.4f} {dice:>7} {iou:>7} {history['step_s']:>7.3f}")
    if comparison:
        c = comparison
        lines.append(
            f"final loss = mean of the last {c['window']} of {c['steps']} steps; fastunet - reference = "
            f"{c['gap']:+.4f} ({100 * c['relative_gap']:+.1f}% of reference); noise {c['noise']:.4f}; "
            f"|gap| = {c['gap_over_noise']:.2f} x noise"
        )
    return "\n".join(lines)


def write_results(result, names, args, device, world):
    """Writes history.json and loss.png, prints the table and logs what was written (rank 0's part of run)."""
    histories = result["models"]
    with open(result["history"], "w") as out:
        json.dump(result, out, indent=2)
    title = (f"{' vs '.join(names)}: {args.data} {args.img_ch}x{args.size}x{args.size}, batch {args.batch}"
             f"{f' x {world}' if world > 1 else ''}, Adam lr {args.lr:g}, {args.loss} loss, {device.type}")
    if args.compare:
        c = result["comparison"]
        title += (f"\nfinal losses (last {c['window']} steps): fastunet - reference = {c['gap']:+.4f} "
                  f"({100 * c['relative_gap']:+.1f}%), {c['gap_over_noise']:.2f} x noise {c['noise']:.4f}")
    plot_losses(histories, result["plot"], title)
    print(format_table(histories, result.get("comparison")))
    log(f"wrote {', '.join(h['checkpoint'] for h in histories.values())}, {result['history']} and "
        f"{result['plot']}")

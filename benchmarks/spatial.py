"""Spatial partitioning (issue 16) on this machine's CPU: one fastunet.U_Net training step (float32, Adam left out)
with each image split by rows over 1, 2 and 4 gloo processes of one thread each (fastunet.parallel.spatial), next
to the whole model in one process (fast mode, and the seed U-Net). Per run: each rank's peak memory (its peak RSS
above its RSS before the model is built, parameters and gradients included), the step time (the slowest rank's,
median), and the halo bytes each step sends (rows to the neighbours before each 3x3 conv, their gradients back).
Then the tallest image of the given width that a per-rank memory budget trains, from a fit of the peaks at two
heights (peak = a + b * height). Prints markdown tables for benchmarks/RESULTS.md.

  python benchmarks/spatial.py [--procs 1,2,4] [--heights 128,256] [--width 128] [--batch 1] [--steps 3]
                               [--budget-mib 1024]
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from procs import add_run_options, largest_side, measure, peak_mib, random_batch, start_peak

import fastunet
from fastunet import parallel, spatial
from fastunet.reference import U_Net as Reference

WHOLE = {"fast": "1, fastunet.U_Net whole (fast mode)", "seed": "1, seed U-Net whole"}


def _worker(rank, world, config):
    """One rank's peak MiB, step seconds and halo bytes per step of ``config``'s run (``config["whole"]``: the
    whole image in one process on fastunet.U_Net or the seed U-Net, else spatial over the ``world`` ranks)."""
    batch, height, width = config["batch"], config["height"], config["width"]
    x, target = random_batch(batch, height, width)
    base_kib = start_peak()
    torch.manual_seed(0)
    halo = [0]
    if config["whole"]:
        model = fastunet.U_Net(3, 1) if config["whole"] == "fast" else Reference(3, 1)
        net, x_local, target_local = model, x, target
    else:
        model = fastunet.U_Net(3, 1)
        net = parallel.spatial(model)
        x_local, target_local = parallel.split_rows(x), parallel.split_rows(target)
        post = spatial._post_edge_rows

        def counted(first, last, rank, world, group):
            works, got = post(first, last, rank, world, group)
            halo[0] += sum(row.nbytes for row in got.values())  # as many bytes as it sent
            return works, got

        spatial._post_edge_rows = counted

    def step():
        model.zero_grad(set_to_none=True)
        ((net(x_local) * target_local).sum() / target.numel()).backward()

    step()  # warm-up
    walls, halos = [], []
    for _ in range(config["steps"]):
        if world > 1:
            dist.barrier()
        halo[0] = 0
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
        halos.append(halo[0])
    return {"peak_mib": peak_mib(base_kib), "wall_s": walls, "halo_bytes": halos}


def summarize(results):
    """One row's numbers: peak MiB per rank, the slowest rank's median step seconds, halo MB per step (all ranks)."""
    step_s = statistics.median(max(r["wall_s"][i] for r in results) for i in range(len(results[0]["wall_s"])))
    return {"peaks": [r["peak_mib"] for r in results], "step_s": step_s,
            "halo_mb": sum(statistics.median(r["halo_bytes"]) for r in results) / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument("--heights", default="128,256",
                        help="two image heights, multiples of 16 x the largest process count: the table's is the "
                             "last (default 128,256)")
    parser.add_argument("--width", type=int, default=128, help="image width (default 128)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    low, high = (int(h) for h in args.heights.split(","))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, one thread per process, batch {args.batch}, "
          f"width {args.width}, {args.steps} timed steps after one warm-up")
    rows = {}
    for label in [*WHOLE, *procs]:
        world = 1 if label in WHOLE else label
        rows[label] = {height: summarize(measure(_worker, world, {
            "batch": args.batch, "height": height, "width": args.width, "steps": args.steps,
            "whole": label if label in WHOLE else None})) for height in (low, high)}
    print(f"\n{args.batch} x 3 x {high} x {args.width} images:\n")
    print("| processes | rows per rank | peak MiB per rank | step s | halo MB per step |")
    print("|---|---:|---|---:|---:|")
    for label, runs in rows.items():
        r = runs[high]
        peaks = " / ".join(f"{p:.0f}" for p in r["peaks"])
        name = WHOLE.get(label, f"{label}, spatial")
        print(f"| {name} | {high // (1 if label in WHOLE else label)} | {peaks} | {r['step_s']:.2f} | "
              f"{r['halo_mb']:.2f} |")
    print(f"\nTallest image of width {args.width} in {args.budget_mib:.0f} MiB per rank (peak = a + b * height "
          f"through {low} and {high}):\n")
    print(f"| processes | peak MiB at {low} / {high} (largest rank) | tallest height |")
    print("|---|---|---:|")
    for label, runs in rows.items():
        a, b = max(runs[low]["peaks"]), max(runs[high]["peaks"])
        side = largest_side(low, high, a, b, args.budget_mib, square=False)
        print(f"| {WHOLE.get(label, f'{label}, spatial')} | {a:.0f} / {b:.0f} | {side} |")


if __name__ == "__main__":
    main()

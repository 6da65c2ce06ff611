"""Spatial partitioning (issues 16, 35) on this machine's CPU: one fastunet.U_Net training step (float32, Adam's
step after it unless --optimizer none) with each image split by rows over 1, 2 and 4 gloo processes of one thread
each (fastunet.parallel.spatial), next to the whole model in one process (fast mode; --whole fast,seed adds the
seed U-Net). Per run: each rank's peak memory (its peak RSS above its RSS before the model is built), what its
parameters, gradients and Adam state take, its activation memory (the peak less those), the step time (the slowest
rank's, median), and the halo bytes each step sends (rows to the neighbours before each 3x3 conv, their gradients
back). Every figure measured at the sizes given, none fitted. Every process maps malloc blocks of 4 MiB or more
apart, as fastunet.train --spatial has it (fastunet.parallel.malloc_mmap_threshold; --mmap-threshold 0: glibc's
malloc as it comes). Prints markdown tables for benchmarks/RESULTS.md.

  python benchmarks/spatial.py [--procs 1,2,4] [--heights 1024] [--width 256] [--batch 1] [--steps 1]
                               [--optimizer adam] [--whole fast] [--mmap-threshold 4]
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from procs import add_run_options, measure, peak_mib, random_batch, start_peak

import fastunet
from fastunet import parallel, spatial
from fastunet.reference import U_Net as Reference

WHOLE = {"fast": "1, fastunet.U_Net whole (fast mode)", "seed": "1, seed U-Net whole"}


def _worker(rank, world, config):
    """One rank's peak MiB, step seconds and halo bytes per step of ``config``'s run (``config["whole"]``: the
    whole image in one process on fastunet.U_Net or the seed U-Net, else spatial over the ``world`` ranks)."""
    batch, height, width = config["batch"], config["height"], config["width"]
    if config["mmap_threshold"]:
        parallel.malloc_mmap_threshold(config["mmap_threshold"] << 20)
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

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4) if config["adam"] else None

    def step():
        model.zero_grad(set_to_none=True)
        ((net(x_local) * target_local).sum() / target.numel()).backward()
        if optimizer is not None:
            optimizer.step()

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
    held_mib = sum(t.nbytes for p in model.parameters() for t in (
        p, p.grad, *(optimizer.state[p].values() if optimizer else ())) if isinstance(t, torch.Tensor)) / 2**20
    return {"peak_mib": peak_mib(base_kib), "held_mib": held_mib, "wall_s": walls, "halo_bytes": halos}


def summarize(results):
    """One row's numbers: peak MiB per rank, parameters + gradients + Adam MiB per rank, the slowest rank's median
    step seconds, halo MB per step (all ranks)."""
    step_s = statistics.median(max(r["wall_s"][i] for r in results) for i in range(len(results[0]["wall_s"])))
    return {"peaks": [r["peak_mib"] for r in results], "held": [r["held_mib"] for r in results], "step_s": step_s,
            "halo_mb": sum(statistics.median(r["halo_bytes"]) for r in results) / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument("--heights", default="1024", help="image heights, multiples of 16 x the largest process "
                                                         "count, one table each (default 1024)")
    parser.add_argument("--width", type=int, default=256, help="image width (default 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--optimizer", default="adam", choices=("adam", "none"),
                        help="Adam's step after each training step, its state held (default), or none")
    parser.add_argument("--whole", default="fast", help="whole models in one process to run too: fast, seed, "
                                                        "both (fast,seed) or none (default fast)")
    parser.add_argument("--mmap-threshold", type=int, default=4,
                        help="MiB: every process's glibc malloc maps blocks of this size or more apart "
                             "(fastunet.parallel.malloc_mmap_threshold, as fastunet.train --spatial sets it; default "
                             "4; 0: malloc as it comes)")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    wholes = [w for w in args.whole.split(",") if w in WHOLE]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, one thread per process, batch {args.batch}, "
          f"width {args.width}, optimizer {args.optimizer}, {args.steps} timed steps after one warm-up, malloc mmap "
          f"threshold {f'{args.mmap_threshold} MiB' if args.mmap_threshold else 'as glibc comes'}")
    for height in (int(h) for h in args.heights.split(",")):
        print(f"\n{args.batch} x 3 x {height} x {args.width} images:\n")
        print("| processes | rows per rank | peak MiB per rank | parameters, gradients, Adam MiB | activation MiB "
              "per rank (peak less those) | largest rank's activations / one process's | step s | halo MB per "
              "step |")
        print("|---|---:|---|---:|---|---:|---:|---:|")
        one = None
        for label in [*wholes, *procs]:
            world = 1 if label in WHOLE else label
            r = summarize(measure(_worker, world, {
                "batch": args.batch, "height": height, "width": args.width, "steps": args.steps,
                "whole": label if label in WHOLE else None, "adam": args.optimizer == "adam",
                "mmap_threshold": args.mmap_threshold}))
            activations = [p - h for p, h in zip(r["peaks"], r["held"])]
            if label == 1:
                one = activations[0]
            ratio = f"{max(activations) / one:.2f}" if one else "-"
            print(f"| {WHOLE.get(label, f'{label}, spatial')} | {height // world} | "
                  f"{' / '.join(f'{p:.0f}' for p in r['peaks'])} | {max(r['held']):.0f} | "
                  f"{' / '.join(f'{a:.0f}' for a in activations)} | {ratio} | {r['step_s']:.2f} | "
                  f"{r['halo_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

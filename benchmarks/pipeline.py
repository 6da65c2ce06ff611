"""Pipeline parallelism (issue 15) on this machine's CPU: one fastunet.U_Net training step (fast mode, float32,
Adam left out) on 1, 2 and 4 gloo processes of one thread each, through fastunet.parallel.build_pipeline (each
rank builds only its own stages, from a U-Net on the meta device). One process runs the whole U-Net, on the
whole batch and on the same micro-batches accumulated. Per run: each rank's peak memory (its peak RSS above its
RSS before the model is built), the step time, the bubble (the share of the step a rank spends not computing:
1 - its CPU time / the step's wall time, next to GPipe's ideal (P - 1) / (M + P - 1)) and the bytes sent per step
(every stage's outputs forward and their gradients back). Then the largest square image that a per-rank memory
budget trains, from a fit of the peaks at two sizes (peak = a + b * pixels, which activation memory follows).
Prints markdown tables for benchmarks/RESULTS.md.

  python benchmarks/pipeline.py [--procs 1,2,4] [--sizes 64,128] [--batch 4] [--microbatches 4]
                                [--schedule 1f1b] [--balance memory] [--steps 3] [--budget-mib 1024]
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from procs import add_run_options, largest_side, measure, peak_mib, random_batch, start_peak

import fastunet
from fastunet import parallel
from fastunet.model import LEVELS


def _loss(logits, target):
    return (logits * target).mean()


def _whole_model_step(model, x, target, microbatches):
    """One process: forward and backward over ``microbatches`` chunks of the batch, gradients accumulated."""
    model.zero_grad(set_to_none=True)
    for xm, tm in zip(x.chunk(microbatches), target.chunk(microbatches)):
        (_loss(model(xm), tm) / microbatches).backward()


def _worker(rank, world, config):
    size, batch, microbatches = config["size"], config["batch"], config["microbatches"]
    x, target = random_batch(batch, size, size)
    base_kib = start_peak()
    torch.manual_seed(0)
    sent = [0]
    if world == 1:
        model = fastunet.U_Net(3, 1)
        levels = list(LEVELS)

        def step():
            _whole_model_step(model, x, target, microbatches)
    else:
        with torch.device("meta"):
            model = fastunet.U_Net(3, 1)
        local = parallel.build_pipeline(model, microbatches, _loss, schedule=config["schedule"],
                                        balance=config["balance"])
        levels = [name for module in local.modules for name in LEVELS[module.first:module.end]]
        for module in local.modules:
            if module.end < len(LEVELS):  # its outputs go to the next stage, their gradients come back
                module.register_forward_hook(
                    lambda _m, _i, out: sent.__setitem__(0, sent[0] + 2 * sum(t.nbytes for t in out)))

        def step():
            for module in local.modules:
                module.zero_grad(set_to_none=True)
            args = (x,) if local.first else ()
            kwargs = {"target": target, "losses": []} if local.last else {}
            local.schedule.step(*args, **kwargs)

    step()  # warm-up (the pipeline infers its message shapes here)
    walls, cpus, sent_bytes = [], [], []
    for _ in range(config["steps"]):
        if world > 1:
            dist.barrier()
        sent[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        sent_bytes.append(sent[0])
    return {"rank": rank, "levels": levels, "peak_mib": peak_mib(base_kib),
            "wall_s": walls, "cpu_s": cpus, "sent_bytes": sent_bytes}


def summarize(world, microbatches, results):
    """One table row's numbers: peak MiB per rank, median step seconds, each rank's bubble, MB sent per step."""
    step_s = statistics.median(max(r["wall_s"][i] for r in results) for i in range(len(results[0]["wall_s"])))
    bubbles = [1 - sum(r["cpu_s"]) / sum(r["wall_s"]) for r in results]
    ideal = (world - 1) / (microbatches + world - 1)
    sent_mb = sum(statistics.median(r["sent_bytes"]) for r in results) / 1e6
    return {"peaks": [r["peak_mib"] for r in results], "step_s": step_s, "bubbles": bubbles, "ideal": ideal,
            "sent_mb": sent_mb, "levels": [r["levels"] for r in results]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument("--sizes", default="64,128", help="two image sides: the table's is the last (default 64,128)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
    parser.add_argument("--balance", default="memory", choices=parallel.BALANCES,
                        help="how build_pipeline cuts the stages (default memory)")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    small, large = (int(s) for s in args.sizes.split(","))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, one thread per process, {args.schedule}, "
          f"balance {args.balance}, "
          f"batch {args.batch} in {args.microbatches} micro-batches, {args.steps} timed steps after one warm-up")
    rows = {}
    for world in procs:
        runs = {}
        for size in (small, large):
            config = {"size": size, "batch": args.batch, "microbatches": args.microbatches,
                      "schedule": args.schedule, "balance": args.balance, "steps": args.steps}
            runs[size] = summarize(world, args.microbatches, measure(_worker, world, config))
            if world == 1:  # and the whole batch at once
                runs[(size, "whole")] = summarize(1, 1, measure(_worker, 1, {**config, "microbatches": 1}))
        rows[world] = runs
    print(f"\n{large}x{large} images:\n")
    print("| processes | levels per rank | peak MiB per rank | step s | bubble per rank (ideal) | MB sent per step |")
    print("|---|---|---|---:|---|---:|")
    for world, runs in rows.items():
        entries = [("1, whole batch", runs[(large, "whole")])] if world == 1 else []
        entries.append((f"{world}" + (f", {args.microbatches} micro-batches accumulated" if world == 1 else ""),
                        runs[large]))
        for label, r in entries:
            levels = " / ".join(f"{ls[0]}..{ls[-1]}" if len(ls) > 1 else ls[0] for ls in r["levels"])
            peaks = " / ".join(f"{p:.0f}" for p in r["peaks"])
            bubbles = " / ".join(f"{b:.2f}" for b in r["bubbles"])
            print(f"| {label} | {levels} | {peaks} | {r['step_s']:.2f} | {bubbles} ({r['ideal']:.2f}) | "
                  f"{r['sent_mb']:.1f} |")
    print(f"\nLargest square image in {args.budget_mib:.0f} MiB per rank (peak = a + b * pixels through {small} and "
          f"{large}):\n")
    print("| processes | peak MiB at " + f"{small} / {large} (largest rank) | largest side |")
    print("|---|---|---:|")
    for world, runs in rows.items():
        a, b = max(runs[small]["peaks"]), max(runs[large]["peaks"])
        side = largest_side(small, large, a, b, args.budget_mib)
        print(f"| {world}{', micro-batches' if world == 1 else ''} | {a:.0f} / {b:.0f} | {side} |")
        if world == 1:
            a, b = runs[(small, "whole")]["peaks"][0], runs[(large, "whole")]["peaks"][0]
            print(f"| 1, whole batch | {a:.0f} / {b:.0f} | {largest_side(small, large, a, b, args.budget_mib)} |")


if __name__ == "__main__":
    main()

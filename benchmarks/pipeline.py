"""Pipeline parallelism (issues 15, 35) on this machine's CPU: one fastunet.U_Net training step (fast mode,
float32, Adam's step after it unless --optimizer none) on 1, 2 and 4 gloo processes of one thread each, through
fastunet.parallel.build_pipeline (each rank builds only its own stages, from a U-Net on the meta device; the cut
by --balance, given the batch). One process runs the whole U-Net on the same micro-batches accumulated. Per run:
each rank's peak memory (its peak RSS above its RSS before the model is built), the MiB its parameters, gradients
and Adam state take, the step time, the bubble (the share of the step a rank spends not computing: 1 - its CPU
time / the step's wall time, next to GPipe's ideal (P - 1) / (M + P - 1)) and the bytes sent per step (every
stage's outputs forward and their gradients back). With --fit-sides, the largest square image each process count
trains within --budget-mib per rank, every side run (not extrapolated). Prints markdown tables for
benchmarks/RESULTS.md.

  python benchmarks/pipeline.py [--procs 1,2,4] [--sizes 128] [--batch 4] [--microbatches 4] [--schedule 1f1b]
                                [--balance memory] [--optimizer adam] [--steps 3] [--budget-mib 1024]
                                [--fit-sides 128,192,256]
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from procs import add_run_options, measure, peak_mib, random_batch, start_peak

import fastunet
from fastunet import parallel
from fastunet.parallel import UNITS


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
    from torch.distributed import pipelining  # noqa: F401  (its import, torch._dynamo, before the peak's base)

    base_kib = start_peak()
    torch.manual_seed(0)
    sent = [0]
    if world == 1:
        model = fastunet.U_Net(3, 1)
        levels, params = ["Conv1", "Up2"], list(model.parameters())

        def compute():
            _whole_model_step(model, x, target, microbatches)
    else:
        with torch.device("meta"):
            model = fastunet.U_Net(3, 1)
        local = parallel.build_pipeline(model, microbatches, _loss, schedule=config["schedule"],
                                        balance=config["balance"], example_input=x,
                                        optimizer_states=2 if config["adam"] else 0)
        levels = [name for module in local.modules for name in module.unit_names()]
        params = [p for module in local.modules for p in module.parameters()]
        for module in local.modules:
            if module.end < len(UNITS):  # its outputs go to the next stage, their gradients come back
                module.register_forward_hook(
                    lambda _m, _i, out: sent.__setitem__(0, sent[0] + 2 * sum(t.nbytes for t in out)))

        def compute():
            for module in local.modules:
                module.zero_grad(set_to_none=True)
            args = (x,) if local.first else ()
            kwargs = {"target": target, "losses": []} if local.last else {}
            local.schedule.step(*args, **kwargs)
    optimizer = torch.optim.Adam(params, lr=1e-4) if config["adam"] else None

    def step():
        compute()
        if optimizer is not None:
            optimizer.step()

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
    held_mib = sum(t.nbytes for p in params for t in (p, p.grad, *(optimizer.state[p].values() if optimizer else ()))
                   if isinstance(t, torch.Tensor)) / 2**20
    return {"rank": rank, "levels": levels, "peak_mib": peak_mib(base_kib), "held_mib": held_mib,
            "wall_s": walls, "cpu_s": cpus, "sent_bytes": sent_bytes}


def summarize(world, microbatches, results):
    """One table row's numbers: peak MiB per rank, the MiB of parameters, gradients and Adam state per rank, median
    step seconds, each rank's bubble, MB sent per step."""
    step_s = statistics.median(max(r["wall_s"][i] for r in results) for i in range(len(results[0]["wall_s"])))
    bubbles = [1 - sum(r["cpu_s"]) / sum(r["wall_s"]) for r in results]
    ideal = (world - 1) / (microbatches + world - 1)
    sent_mb = sum(statistics.median(r["sent_bytes"]) for r in results) / 1e6
    return {"peaks": [r["peak_mib"] for r in results], "held": [r["held_mib"] for r in results], "step_s": step_s,
            "bubbles": bubbles, "ideal": ideal, "sent_mb": sent_mb, "levels": [r["levels"] for r in results]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    parser.add_argument("--sizes", default="128", help="image sides of the first table (default 128)")
    parser.add_argument("--fit-sides", default="",
                        help="image sides to run, smallest first, per process count until the largest rank's peak "
                             "passes --budget-mib: the largest side that trained within it, measured (default: none)")
    parser.add_argument("--budget-mib", type=float, default=1024.0, help="memory budget per rank (default 1024)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b"))
    parser.add_argument("--balance", default="memory", choices=parallel.BALANCES,
                        help="how build_pipeline cuts the stages (default memory)")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "none"),
                        help="Adam's step after each training step, its state held (default), or none")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    adam = args.optimizer == "adam"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, one thread per process, {args.schedule}, "
          f"balance {args.balance}, optimizer {args.optimizer}, batch {args.batch} in {args.microbatches} "
          f"micro-batches, {args.steps} timed steps after one warm-up")

    def run(world, size):
        config = {"size": size, "batch": args.batch, "microbatches": args.microbatches, "schedule": args.schedule,
                  "balance": args.balance, "steps": args.steps, "adam": adam}
        return summarize(world, args.microbatches, measure(_worker, world, config))

    for size in (int(s) for s in args.sizes.split(",") if s):
        print(f"\n{args.batch} x 3 x {size} x {size}:\n")
        print("| processes | levels per rank | peak MiB per rank | largest / mean | parameters, gradients, Adam MiB "
              "per rank | step s | bubble per rank (ideal) | MB sent per step |")
        print("|---|---|---|---:|---|---:|---|---:|")
        for world in procs:
            r = run(world, size)
            label = f"{world}" + (f", {args.microbatches} micro-batches accumulated" if world == 1 else "")
            levels = " / ".join(f"{ls[0]}..{ls[-1]}" if len(ls) > 1 else ls[0] for ls in r["levels"])
            peaks = " / ".join(f"{p:.0f}" for p in r["peaks"])
            held = " / ".join(f"{p:.0f}" for p in r["held"])
            bubbles = " / ".join(f"{b:.2f}" for b in r["bubbles"])
            ratio = max(r["peaks"]) / statistics.mean(r["peaks"])
            print(f"| {label} | {levels} | {peaks} | {ratio:.2f} | {held} | {r['step_s']:.2f} | {bubbles} "
                  f"({r['ideal']:.2f}) | {r['sent_mb']:.1f} |", flush=True)
    sides = [int(s) for s in args.fit_sides.split(",") if s]
    if sides:
        print(f"\nThe largest square image trained in {args.budget_mib:.0f} MiB per rank (each side run; the "
              f"largest rank's peak MiB):\n")
        print("| processes | largest rank's peak MiB at each side run | largest side within the budget |")
        print("|---|---|---:|")
        for world in procs:
            fitted, runs = 0, []
            for side in sides:
                peak = max(run(world, side)["peaks"])
                runs.append(f"{side}: {peak:.0f}")
                if peak > args.budget_mib:
                    break
                fitted = side
            print(f"| {world} | {', '.join(runs)} | {fitted} |", flush=True)


if __name__ == "__main__":
    main()

"""What a serving process holds between inference calls (issue 34): the seed U-Net, fastunet's fast mode and its
inference snapshots (float32, bfloat16), each in a fresh subprocess.

Per model: RSS after building it (and, for a snapshot, after making it from the model, which is then dropped), then
after ``--calls`` eval calls on random ``--batch x 3 x --size^2`` inputs under torch.no_grad(); both read after
``gc.collect()`` and glibc's ``malloc_trim(0)``, so that RSS follows live memory. ``held`` is the growth over the
calls; fastunet's promise is that fast mode's held memory is within a quarter of the parameters' bytes of the
seed's (nothing kept between calls), and a snapshot's is its size (what it was made to hold) and no growth.

  python benchmarks/serving_memory.py [--size 256] [--batch 1] [--calls 4] [--threads 2]
"""

import argparse
import ctypes
import gc
import json
import subprocess
import sys

MODELS = ("seed", "fast", "snapshot_float32", "snapshot_bfloat16")


def _rss_mib():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure(name, size, batch, calls, threads):
    """{'params_mib', 'model_mib' (RSS growth for building what is served), 'held_mib' (over the calls)} of
    ``name`` in this process."""
    import torch

    import fastunet
    from fastunet.reference import U_Net as Seed

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(size)
    inputs = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(calls)]
    before = _rss_mib()
    model = (Seed() if name == "seed" else fastunet.U_Net()).eval()
    params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if name.startswith("snapshot"):
        dtype = torch.bfloat16 if name.endswith("bfloat16") else torch.float32
        model = fastunet.optimize_for_inference(model, inputs[0], dtype=dtype)
    built = _rss_mib()
    with torch.no_grad():
        for x in inputs:
            model(x)
    return {"params_mib": params_mib, "model_mib": built - before, "held_mib": _rss_mib() - built}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)  # one model, in this process
    args = parser.parse_args()
    if args.model:
        print(json.dumps(measure(args.model, args.size, args.batch, args.calls, args.threads)))
        return
    rows = {}
    for name in MODELS:
        command = [sys.executable, __file__, "--model", name, *(f"--{k}={getattr(args, k)}" for k in
                                                                ("size", "batch", "calls", "threads"))]
        rows[name] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    params = rows["seed"]["params_mib"]
    print(f"{args.calls} eval calls of {args.batch} x 3 x {args.size}^2, {args.threads} threads; parameters "
          f"{params:.0f} MiB; MiB of RSS after gc and malloc_trim")
    print("| model | built (MiB) | held after the calls (MiB) | held - seed's, / parameters |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        excess = (row["held_mib"] - rows["seed"]["held_mib"]) / params
        print(f"| {name} | {row['model_mib']:.0f} | {row['held_mib']:.1f} | {excess:+.2f}x |")


if __name__ == "__main__":
    main()

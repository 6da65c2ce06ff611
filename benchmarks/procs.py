"""What the multi-process benchmarks (pipeline.py, spatial.py) share: each rank's peak memory from /proc, spawned
gloo ranks that write their results as JSON."""

import datetime
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_kib(field):
    """A ``/proc/self/status`` field in KiB (VmRSS: resident now, VmHWM: its high-water mark)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss():
    """Resets the kernel's high-water mark of this process's RSS (VmHWM) to its RSS now."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def random_batch(batch, height, width):
    """A random image ``[batch, 3, height, width]`` and target ``[batch, 1, height, width]``, the same on every rank."""
    generator = torch.Generator().manual_seed(height)
    return torch.randn(batch, 3, height, width, generator=generator), torch.randn(batch, 1, height, width,
                                                                                   generator=generator)


def start_peak():
    """Resets this rank's peak RSS; its RSS now (KiB), the base of peak_mib."""
    _reset_peak_rss()
    return _status_kib("VmRSS")


def peak_mib(base_kib):
    """This rank's peak RSS since start_peak, above the RSS it returned, in MiB."""
    return (_status_kib("VmHWM") - base_kib) / 1024


def add_run_options(parser):
    """The options both benchmarks take: --procs, --steps."""
    parser.add_argument("--procs", default="1,2,4", help="process counts (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank, worker, world, port, config, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        result = worker(rank, world, config)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
            json.dump(result, out)
    finally:
        dist.destroy_process_group()


def measure(worker, world, config):
    """``worker(rank, world, config)`` (a module-level function returning a JSON-able dict) on ``world`` spawned
    processes of one thread each, joined by a gloo process group (one process too); every rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_run_rank, args=(worker, world, _free_port(), config, out_dir), nprocs=world)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results

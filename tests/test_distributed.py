"""fastunet under DistributedDataParallel, with and without synchronized BatchNorm, on 2 ranks.

The ranks are processes spawned by the test (gloo on the CPU; NCCL on two GPUs where there are two),
bounded in time and cleaned up. Each rank trains one step of DDP(model) on its slice of a batch; the test
compares the outputs, input gradients, DDP-averaged parameter gradients and BN buffers of fastunet with the
pure-PyTorch reference model trained the same way (DDP, same BN synchronization), both judged against a float64
single-process run of the reference on the concatenated batch (synchronized BN) or on each rank's batch
(per-rank BN): exact mode bit for bit the distributed reference, fast mode within 2x of its error.
The distributed reference with synchronized BN is the reference model converted by
fastunet.convert_sync_batchnorm (nn.SyncBatchNorm's own function on CUDA, its pure-PyTorch twin on the CPU,
where nn.SyncBatchNorm does not run); on two GPUs it is also compared with nn.SyncBatchNorm itself.
Each rank's loss is sum(out * g); DDP averages parameter gradients over the R ranks, so the single-process
equivalent loss is sum(out * g) / R, and a rank's input gradient is that of the sum of all ranks' losses.
"""

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from conftest import HAS_GPU
from helpers import (
    conv_bias_before_bn,
    free_port,
    relative_error,
    scratch_dir,
    spawn_ranks,
    train_step,
    well_conditioned,
)

import fastunet
from fastunet.reference import U_Net as Reference

WORLD = 2
TIMEOUT_S = 300


def _rank_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank, port, backend, case_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.deterministic = True
    dist.init_process_group(backend, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        case = torch.load(case_path)
        for name, run in case["runs"].items():
            sl = _rank_slice(run["sizes"], rank)
            x, g = run["x"][sl].to(device), run["g"][sl].to(device)
            model = Reference(3, 2) if run["model"] == "reference" else fastunet.U_Net(3, 2, exact=run["exact"])
            model.load_state_dict(case["state"])
            if run["sync"] == "torch":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif run["sync"]:
                model = fastunet.convert_sync_batchnorm(model)
            ddp = torch.nn.parallel.DistributedDataParallel(model.to(device))
            out, gx, grads, buffers = train_step(ddp, x, g)
            result = (out.cpu(), gx.cpu(), {k.removeprefix("module."): v.cpu() for k, v in grads.items()},
                      {k.removeprefix("module."): v.cpu() for k, v in buffers.items()})
            torch.save(result, SavedRuns(out_dir, rank).path(name))
            del model, ddp, out, gx, grads, buffers, result
    finally:
        dist.destroy_process_group()


class SavedRuns:
    """One rank's results, a file per run, loaded when asked for: ``runs[name]`` -> (out, input grad, parameter
    grads, buffers). Held all at once, the CPU cases' 18 results took 2.2 GB of the pytest process."""

    def __init__(self, directory, rank, prefix=""):
        self.directory, self.rank, self.prefix = str(directory), rank, prefix

    def path(self, name):
        return os.path.join(self.directory, f"rank{self.rank}-{(self.prefix + name).replace('/', '-')}.pt")

    def __getitem__(self, name):
        return torch.load(self.path(name))


def run_ranks(tmp_path, runs, state, backend="gloo"):
    """Runs ``runs`` on WORLD spawned ranks; returns each rank's results (SavedRuns). Fails (and kills the ranks)
    after TIMEOUT_S seconds."""
    case_path = str(tmp_path / "case.pt")
    torch.save({"runs": runs, "state": state}, case_path)
    spawn_ranks(_worker, (free_port(), backend, case_path, str(tmp_path)), WORLD, TIMEOUT_S)
    return [SavedRuns(tmp_path, r) for r in range(WORLD)]


def _gathered(per_rank, name):
    """One run's results as the single-process view: outputs and input grads concatenated over the ranks,
    parameter grads (DDP-averaged, so every rank's must be equal) and buffers from rank 0."""
    outs = [r[name] for r in per_rank]
    for other in outs[1:]:
        for k in outs[0][2]:
            assert torch.equal(other[2][k], outs[0][2][k]), f"{name}: DDP left rank grads of {k} different"
    return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2], outs[0][3])


def _reference():
    torch.manual_seed(1234)
    ref = Reference(3, 2)
    well_conditioned(ref)
    return ref


def _batch(sizes, size):
    """(x, g) of sum(sizes) images of size x size."""
    n = sum(sizes)
    return torch.randn(n, 3, size, size), torch.randn(n, 2, size, size)


def _assert_bitwise(got, want, what):
    for i, name in enumerate(("output", "input gradient")):
        assert torch.equal(got[i], want[i]), f"{what}: {name}"
    for i, name in ((2, "grad"), (3, "buffer")):
        for k in want[i]:
            assert torch.equal(got[i][k], want[i][k]), f"{what}: {name} {k}"


def _zero_in_exact_arithmetic(name, grad64, total):
    """Conv biases feeding a training-mode BN, and (at a 1x1 bottleneck, where the next conv is a per-pixel
    linear map in front of BN) BN biases: their exact gradient is 0 and their float values rounding noise."""
    return conv_bias_before_bn(name) or grad64.norm().item() <= 1e-9 * total


def _assert_is_synchronized_bn(got, want64):
    """``got`` computes what the float64 run on the concatenated batch computes, up to float32 rounding and the
    odd max-pool near-tie that rounding flips (which moves a tensor's gradient by ~1e-3 relative; BN statistics
    of the wrong batch move them by far more). Zero gradients are held to a norm-scaled absolute bound."""
    total = torch.cat([v.flatten() for v in want64[2].values()]).norm().item()
    for k, v in want64[2].items():
        if _zero_in_exact_arithmetic(k, v, total):
            assert (got[2][k].double() - v).norm().item() <= 1e-5 * total, k
        else:
            assert relative_error(got[2][k], v) <= 1e-2, k
    assert relative_error(got[0], want64[0]) <= 1e-4 and relative_error(got[1], want64[1]) <= 1e-2
    for k, v in want64[3].items():
        assert relative_error(got[3][k], v) <= 1e-4, k


FLIP = 3e-3  # the relative move of a gradient when rounding flips one max-pool near-tie (measured ~1e-3)


def _assert_fast_within_twice(got, want, want64):
    """Fast mode against the float64 run: the output and BN buffers (what the synchronized statistics set) within
    2x of the distributed reference's error, as in tests/test_model.py; the gradients too, but with room for
    one max-pool near-tie flipped by rounding in either run (a wrong synchronization moves them by > 1e-2)."""
    assert relative_error(got[0], want64[0]) <= 2 * relative_error(want[0], want64[0]) + 1e-7
    for k, v in want64[3].items():
        if not k.endswith("num_batches_tracked"):
            assert relative_error(got[3][k], v) <= 2 * relative_error(want[3][k], v) + 1e-7, k
    assert relative_error(got[1], want64[1]) <= 2 * relative_error(want[1], want64[1]) + FLIP
    total = torch.cat([v.flatten() for v in want64[2].values()]).norm().item()
    for k, v in want64[2].items():
        if _zero_in_exact_arithmetic(k, v, total):
            assert (got[2][k].double() - v).norm().item() <= 1e-5 * total, k
        else:
            assert relative_error(got[2][k], v) <= 2 * relative_error(want[2][k], v) + FLIP, k


def _runs(sync, sizes, x, g):
    common = dict(sync=sync, sizes=sizes, x=x, g=g)
    return {"reference": dict(model="reference", exact=True, **common),
            "exact": dict(model="fastunet", exact=True, **common),
            "fast": dict(model="fastunet", exact=False, **common)}


# The CPU cases: (synchronized BN, images per rank, image size).
CPU_CASES = {"even": (True, (2, 2), 32), "uneven-rank-of-1": (True, (3, 1), 16), "per-rank": (False, (2, 2), 32)}


@pytest.fixture(scope="module")
def cpu_cases(tmp_path_factory):
    """{case: (reference model, x, g, each rank's results)} of CPU_CASES, every case's runs made by one pair of
    spawned gloo ranks (spawning them costs seconds)."""
    ref = _reference()
    runs, inputs = {}, {}
    for case, (sync, sizes, size) in CPU_CASES.items():
        inputs[case] = _batch(sizes, size)
        runs.update({f"{case}/{name}": run for name, run in _runs(sync, sizes, *inputs[case]).items()})
    with scratch_dir(tmp_path_factory, "ranks") as directory:
        run_ranks(directory, runs, ref.state_dict())
        yield {case: (ref, *inputs[case], [SavedRuns(directory, rank, f"{case}/") for rank in range(WORLD)])
               for case in CPU_CASES}


@pytest.mark.parametrize("case", ["even", "uneven-rank-of-1"])
def test_sync_bn_matches_the_distributed_reference_and_the_concatenated_batch(cpu_cases, case):
    """Synchronized BN = one process on the whole batch: the distributed reference within float32 rounding of
    the float64 single-process run, exact mode bitwise that reference, fast mode within 2x of its error;
    also with an uneven split where one rank holds one image and the 1x1 bottleneck one value per channel."""
    ref, x, g, per_rank = cpu_cases[case]

    def single_process_view(name):
        out, gx, grads, buffers = _gathered(per_rank, name)
        return out, gx / WORLD, grads, buffers

    want = single_process_view("reference")
    _assert_bitwise(single_process_view("exact"), want, "exact mode")
    want64 = train_step(copy.deepcopy(ref).double(), x.double(), g.double() / WORLD)
    _assert_is_synchronized_bn(want, want64)
    _assert_fast_within_twice(single_process_view("fast"), want, want64)


def test_per_rank_bn_matches_the_reference_under_ddp(cpu_cases):
    """Without sync each rank normalizes its own batch: exact mode is bitwise DDP(reference); fast mode is
    within 2x of its error against per-rank float64 references, averaged as DDP averages."""
    sizes = CPU_CASES["per-rank"][1]
    ref, x, g, per_rank = cpu_cases["per-rank"]
    for rank in range(WORLD):
        _assert_bitwise(per_rank[rank]["exact"], per_rank[rank]["reference"], f"rank {rank}")
    ref64 = copy.deepcopy(ref).double()
    steps = [train_step(copy.deepcopy(ref64), x[_rank_slice(sizes, r)].double(), g[_rank_slice(sizes, r)].double())
             for r in range(WORLD)]
    want64 = (torch.cat([s[0] for s in steps]), torch.cat([s[1] for s in steps]),
              {k: sum(s[2][k] for s in steps) / WORLD for k in steps[0][2]}, steps[0][3])
    fast = _gathered(per_rank, "fast")
    _assert_fast_within_twice(fast, _gathered(per_rank, "reference"), want64)
    for k, b in per_rank[1]["fast"][3].items():  # rank 1 keeps its own running stats until DDP's next broadcast
        if k.endswith("running_mean"):
            assert not torch.equal(b, fast[3][k]), f"rank 1's {k} should come from its own batch"


@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs")
def test_sync_bn_on_cuda_matches_nn_sync_batchnorm(tmp_path):
    """On two GPUs (NCCL): fastunet.SyncBatchNorm and fastunet's exact mode are bitwise the
    nn.SyncBatchNorm-converted reference; fast mode is within 2x of its error against float64."""
    sizes = (2, 2)
    ref, (x, g) = _reference(), _batch(sizes, 32)
    runs = _runs(True, sizes, x, g)
    runs["torch"] = dict(runs["reference"], sync="torch")
    per_rank = run_ranks(tmp_path, runs, ref.state_dict(), backend="nccl")
    want = _gathered(per_rank, "torch")
    _assert_bitwise(_gathered(per_rank, "reference"), want, "fastunet.SyncBatchNorm")
    _assert_bitwise(_gathered(per_rank, "exact"), want, "exact mode")
    out, gx, grads, buffers = want
    want64 = train_step(copy.deepcopy(ref).double(), x.double(), g.double() / WORLD)
    fast = _gathered(per_rank, "fast")
    _assert_fast_within_twice((fast[0], fast[1] / WORLD, *fast[2:]), (out, gx / WORLD, grads, buffers), want64)


def test_convert_sync_batchnorm_keeps_state_dict_and_is_batchnorm_outside_distributed():
    """Converted models keep the state_dict keys and tensors (checkpoints load both ways), share the
    original parameters, and without torch.distributed behave bit for bit as nn.BatchNorm2d."""
    ref = Reference(3, 2)
    model = fastunet.U_Net(3, 2, exact=True)
    model.load_state_dict(ref.state_dict())
    weight = model.Conv1.conv[1].weight
    synced = fastunet.convert_sync_batchnorm(model)
    assert isinstance(synced.Conv1.conv[1], fastunet.SyncBatchNorm) and synced.Conv1.conv[1].weight is weight
    assert list(synced.state_dict()) == list(ref.state_dict())
    Reference(3, 2).load_state_dict(synced.state_dict())
    x, g = torch.randn(2, 3, 32, 32), torch.randn(2, 2, 32, 32)
    got, want = train_step(synced, x, g), train_step(ref, x, g)
    _assert_bitwise(got, want, "converted model without torch.distributed")

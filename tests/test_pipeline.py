"""fastunet.parallel.build_pipeline on 2 and 4 gloo ranks (spawned processes, bounded in time): one training step of
every schedule against a single process accumulating the gradients over the same micro-batches, exact mode, bit
for bit: the logits, every parameter gradient and every BatchNorm buffer; the checkpoint gathered on rank 0 loads
strictly into the seed U-Net."""

import copy
import os

import pytest
import torch
from helpers import assert_bitwise, free_port, gloo_process_group, scratch_dir, spawn_ranks, well_conditioned

import fastunet
from fastunet import parallel
from fastunet.reference import U_Net as Reference

TIMEOUT_S = 300


def _linear_loss(logits, g):
    return (logits * g).sum()


def _worker(rank, world, port, case_path, out_dir):
    """One step of each of the case's schedules, one after the other, in one process group."""
    with gloo_process_group(rank, world, port):
        case = torch.load(case_path)
        for schedule in case["schedules"]:
            model = fastunet.U_Net(3, 2, exact=True)
            model.load_state_dict(case["state"])
            local = parallel.build_pipeline(model, case["microbatches"], _linear_loss, schedule=schedule,
                                            example_input=case["x"])
            args = (case["x"],) if local.first else ()
            kwargs = dict(target=case["g"], losses=[]) if local.last else {}
            out = local.schedule.step(*args, **kwargs)
            result = {"grads": {n: p.grad for m in local.modules for n, p in m.named_parameters()},
                      "buffers": {n: b for m in local.modules for n, b in m.named_buffers()}}
            if local.last:
                result["out"] = out
            checkpoint = parallel.gather_state_dict(local)
            if rank == 0:
                result["checkpoint"] = checkpoint
            torch.save(result, os.path.join(out_dir, f"{schedule}-rank{rank}.pt"))


def run_pipeline(tmp_path, world, schedules, microbatches, state, x, g):
    """One step of each of ``schedules`` on the same ``world`` spawned gloo ranks (spawning them costs seconds); for
    each, the ranks' results merged: {schedule: (logits, parameter grads, buffers, rank 0's gathered checkpoint)}.
    Fails (and kills the ranks) after TIMEOUT_S seconds."""
    case_path = str(tmp_path / "case.pt")
    torch.save(dict(state=state, schedules=schedules, microbatches=microbatches, x=x, g=g), case_path)
    spawn_ranks(_worker, (world, free_port(), case_path, str(tmp_path)), world, TIMEOUT_S)
    merged = {}
    for schedule in schedules:
        results = [torch.load(tmp_path / f"{schedule}-rank{r}.pt") for r in range(world)]
        outs = [r["out"] for r in results if "out" in r]
        assert len(outs) == 1
        grads, buffers = {}, {}
        for r in results:
            assert not set(r["grads"]) & set(grads), "two ranks hold the same parameters"
            grads.update(r["grads"])
            buffers.update(r["buffers"])
        merged[schedule] = outs[0], grads, buffers, results[0]["checkpoint"]
    return merged


def accumulated_step(model, x, g, microbatches):
    """What a pipeline step computes, in one process: forward and backward micro-batch by micro-batch, the
    parameter gradients summed and then divided by the number of micro-batches (the schedules' scale_grads). One
    thread, as each rank runs (a conv's summation order may follow the thread count)."""
    outs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for xm, gm in zip(x.chunk(microbatches), g.chunk(microbatches)):
            out = model(xm)
            _linear_loss(out, gm).backward()
            outs.append(out.detach())
    finally:
        torch.set_num_threads(threads)
    for p in model.parameters():
        p.grad.div_(microbatches)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return torch.cat(outs), grads, dict(model.named_buffers())


MICROBATCHES = 4
TWO_RANK_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zbv")


def draw_case():
    """(state of a well-conditioned exact-mode U-Net, input ``[4, 3, 32, 32]``, output gradient), freshly drawn."""
    model = fastunet.U_Net(3, 2, exact=True)
    well_conditioned(model)
    return copy.deepcopy(model.state_dict()), torch.randn(4, 3, 32, 32), torch.randn(4, 2, 32, 32)


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    """(state, x, g, {schedule: merged results}): every 2-rank schedule's step on one case, by one pair of ranks."""
    state, x, g = draw_case()
    with scratch_dir(tmp_path_factory, "two_ranks") as directory:
        return state, x, g, run_pipeline(directory, 2, TWO_RANK_SCHEDULES, MICROBATCHES, state, x, g)


@pytest.mark.parametrize("world, schedule", [*((2, s) for s in TWO_RANK_SCHEDULES), (4, "1f1b")])
def test_a_pipeline_step_is_gradient_accumulation_bit_for_bit(request, tmp_path, world, schedule):
    if world == 2:
        state, x, g, steps = request.getfixturevalue("two_rank_steps")
    else:
        state, x, g = draw_case()
        steps = run_pipeline(tmp_path, world, [schedule], MICROBATCHES, state, x, g)
    got = steps[schedule]
    model = fastunet.U_Net(3, 2, exact=True)
    model.load_state_dict(state)
    want = accumulated_step(model, x, g, MICROBATCHES)
    assert_bitwise(got[0], want[0], "logits")
    assert sorted(got[1]) == sorted(want[1]) and sorted(got[2]) == sorted(want[2])
    for name in want[1]:
        assert_bitwise(got[1][name], want[1][name], f"grad of {name}")
    for name in want[2]:
        assert_bitwise(got[2][name], want[2][name], f"buffer {name}")
    seed = Reference(3, 2)
    seed.load_state_dict(got[3], strict=True)  # the checkpoint gathered on rank 0, after the step's BN updates
    for name, value in model.state_dict().items():
        assert_bitwise(got[3][name], value, f"checkpoint {name}")

"""fastunet.parallel.pipeline_stages in one process: the stages chained as a pipeline chains them (each stage's
inputs detached leaves, gradients handed back stage by stage) against the whole model."""

import copy
import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from helpers import (
    assert_results_bitwise,
    assert_within_twice_reference_error,
    pair,
    pool_tie_free,
    train_step,
    well_conditioned,
)

import fastunet
from fastunet import parallel
from fastunet.parallel import UNITS
from fastunet.reference import U_Net as Reference

CUTS = [((), "one stage"), (("Conv3",), "encoder | rest"), (("Up4",), "Conv4 and Up5 in one stage"),
        (("Conv2", "Conv5", "Up2"), "four stages"), (("Conv4", "Conv5.conv.3", "Up5"), "the bottleneck's layers apart")]


def chained_step(stages, x, grad_out):
    """A training step through the stages as a pipeline runs it: every stage's inputs are leaves of their own
    (what it receives), its outputs' gradients are the raw gradients of the next stage's inputs (what that stage
    sends back, before any accumulation into a ``.grad`` would lay them out anew). Returns the train_step tuple of
    the model and the gradients the stages after the first handed back (to check they are sendable: contiguous)."""
    model = stages[0].model
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    inputs, outputs, sent = [], [], {}
    received = (x,)
    for stage in stages:
        leaves = tuple(t if t is x else t.detach().requires_grad_() for t in received)
        if stage is not stages[0]:
            for leaf in leaves:
                leaf.register_hook(lambda g, leaf=leaf: sent.__setitem__(leaf, g))
        out = stage(*leaves)
        if stage is not stages[-1]:
            assert all(t.is_contiguous() for t in out), "a stage hands on a tensor send and recv refuse"
        inputs.append(leaves)
        outputs.append(out if isinstance(out, tuple) else (out,))
        received = outputs[-1]
    logits = outputs[-1][0]
    (logits * grad_out).sum().backward()
    handed_back = []
    for s in reversed(range(1, len(stages))):
        grads = [sent[leaf] for leaf in inputs[s]]
        handed_back.extend(grads)
        torch.autograd.backward(outputs[s - 1], grads)
    params = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return (logits.detach(), x.grad, params, buffers), handed_back


@pytest.mark.parametrize("boundaries, _", CUTS, ids=[c[1] for c in CUTS])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_chained_stages_are_the_model_bit_for_bit_in_exact_mode(boundaries, _, memory_format):
    torch.manual_seed(0)
    _, whole = pair(exact=True)
    whole.to(memory_format=memory_format)  # a channels_last model's stages pass on NHWC-ordered tensors
    cut = copy.deepcopy(whole)
    stages = parallel.pipeline_stages(cut, len(boundaries) + 1, boundaries=boundaries)
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=memory_format)
    for _ in range(2):  # the running stats move twice
        g = torch.randn(3, 2, 32, 32)
        want = train_step(whole, x, g)
        got, handed_back = chained_step(stages, x, g)
        assert_results_bitwise(got, want)
        assert all(t.is_contiguous() for t in handed_back)
        assert len(handed_back) == sum(1 + len(s.skips_in) for s in stages[1:])
    whole.eval(), cut.eval()
    with torch.no_grad():
        h = (x,)
        for stage in stages:
            h = stage(*h)
            h = h if isinstance(h, tuple) else (h,)
        assert torch.equal(h[0], whole(x))


def test_skip_gradients_handed_back_are_contiguous():
    """A skip's gradient leaves torch.cat as a channel slice, which a send may refuse: the stages hand it back
    contiguous, as raw gradients (fails without parallel._ContiguousGrad)."""
    torch.manual_seed(1)
    _, model = pair(exact=False)
    stages = parallel.pipeline_stages(model, 2, boundaries=("Conv5",))
    assert stages[1].skips_in == (0, 1, 2, 3)
    assert stages[1].unit_names() == ["Conv5", "Up5", "Up4", "Up3", "Up2"]  # both bottleneck layers: the level
    _, handed_back = chained_step(stages, torch.randn(2, 3, 32, 32), torch.randn(2, 2, 32, 32))
    assert len(handed_back) == 5 and all(t.is_contiguous() for t in handed_back)


@pytest.mark.parametrize("boundaries", [None, ("Conv5", "Conv5.conv.3")], ids=["balanced", "bottleneck apart"])
def test_fast_mode_stages_are_within_the_error_rule(boundaries):
    ref, model = pair(exact=False)
    well_conditioned(ref, model)
    ref64 = copy.deepcopy(ref).double()
    stages = parallel.pipeline_stages(model, 3, image_size=32, boundaries=boundaries)
    x, g = pool_tie_free(ref64, lambda: torch.randn(2, 3, 32, 32)), torch.randn(2, 2, 32, 32)
    got, _ = chained_step(stages, x, g)
    assert_within_twice_reference_error(got, train_step(ref, x, g), train_step(ref64, x.double(), g.double()))


def test_stages_share_the_parameters_and_their_state_dicts_load_into_the_seed():
    model = fastunet.U_Net(3, 2)
    for num_stages in range(1, len(UNITS) + 1):
        stages = parallel.pipeline_stages(model, num_stages, image_size=64)
        keys = [k for s in stages for k in s.state_dict()]
        assert sorted(keys) == sorted(model.state_dict()) and len(keys) == len(set(keys))
        for stage in stages:
            for name, p in stage.named_parameters():
                assert p is model.get_parameter(name)
    merged = {k: v for s in parallel.pipeline_stages(model, 3, balance="flops") for k, v in s.state_dict().items()}
    seed = Reference(3, 2)
    seed.load_state_dict(merged, strict=True)
    assert all(torch.equal(v, seed.state_dict()[k]) for k, v in merged.items())


def test_balanced_cuts_minimise_the_costliest_stage():
    model = fastunet.U_Net(3, 1)
    memory, flops = parallel.level_costs(model, "memory"), parallel.level_costs(model, "flops")
    assert max(memory) in (memory[0], memory[-1])  # full resolution holds the most activations
    assert memory != flops
    for costs in (memory, flops):
        for stages in (2, 3, 4):
            cut = parallel.balanced_boundaries(costs, stages)
            worst = _worst(costs, cut)
            for other in _all_cuts(len(costs), stages):
                assert worst <= _worst(costs, other)
    stages = parallel.pipeline_stages(model, 2, balance="flops")
    assert stages[1].first == parallel.balanced_boundaries(flops, 2)[0]


def _saved_bytes_per_unit(model, x):
    """The bytes each unit saves for backward (torch.autograd.graph.saved_tensors_hooks; each storage once,
    parameters left out) in a training forward of ``x``, the units run as one-unit stages."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted, h = [], (x,)
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    for stage in parallel.pipeline_stages(model, len(UNITS), boundaries=UNITS[1:]):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = stage(*(t.detach().requires_grad_() for t in h))
        h = h if isinstance(h, tuple) else (h,)
        counted.append(sum(saved.values()))
    return counted


@pytest.mark.parametrize("exact", [False, True])
def test_memory_balance_counts_what_a_rank_holds(exact):
    model = fastunet.U_Net(3, 1, exact=exact)
    x = torch.randn(2, 3, 64, 64)
    held = parallel.memory_model(model, x, held=[2, 1], num_stages=2)
    for unit, stage in enumerate(parallel.pipeline_stages(model, len(UNITS), boundaries=UNITS[1:])):
        param_bytes = sum(4 * p.numel() for p in stage.parameters())
        assert held.parameters[unit] == 4 * param_bytes  # the parameters, their gradients, Adam's two moments
    assert sum(held.parameters) == 4 * sum(4 * p.numel() for p in model.parameters())
    sgd = parallel.memory_model(model, x, optimizer_states=0)
    assert all(2 * a == b for a, b in zip(sgd.parameters, held.parameters))
    # the saved activations estimated from the convolutions' outputs: within a third of what training saves (the
    # bottleneck's layers, each alone on a stage, run by their own modules: layer_activations)
    estimates = list(held.activations)
    estimates[UNITS.index("Conv5.conv.0"):UNITS.index("Conv5.conv.3") + 1] = held.layer_activations
    for unit, (estimate, counted) in enumerate(zip(estimates, _saved_bytes_per_unit(model, x))):
        assert 0.75 * counted <= estimate <= 1.35 * counted, UNITS[unit]
    # the boundary of a cut before Up4: Up5's output and the 3 upper skips (2 images, float32), held for each
    # micro-batch and once more for the gradients
    boundary = 4 * 2 * (512 * 8 * 8 + 64 * 64 * 64 + 128 * 32 * 32 + 256 * 16 * 16)
    up4 = UNITS.index("Up4")
    assert held.stage(1, up4, len(UNITS)) == pytest.approx(
        sum(held.parameters[up4:]) + sum(held.activations[up4:]) + 2 * boundary)
    # a stage holding two micro-batches holds their activations and boundaries twice
    assert held.stage(0, 0, up4) == pytest.approx(sum(held.parameters[:up4]) + 2 * sum(held.activations[:up4])
                                                  + 3 * boundary)


def test_the_memory_balance_follows_the_image_size():
    with torch.device("meta"):
        model = fastunet.U_Net(3, 1)
    cuts = {}
    for side in (128, 1024):
        one_f_one_b = [4, 3, 2, 1]  # what build_pipeline passes for 1F1B over 4 stages and 4 micro-batches
        costs = parallel.memory_model(model, (1, 3, side, side), held=one_f_one_b, num_stages=4)
        cut = parallel.balanced_boundaries(costs, 4)
        for other in _all_cuts(len(UNITS), 4):
            assert _worst_stage(costs, cut) <= _worst_stage(costs, other)
        stages = parallel.pipeline_stages(model, 4, example_input=torch.empty(1, 3, side, side, device="meta"),
                                          held_microbatches=one_f_one_b)
        assert tuple(s.first for s in stages[1:]) == cut
        if side == 128:
            assert [s.unit_names() for s in stages] == [["Conv1", "Conv2", "Conv3", "Conv4", "Conv5.conv.0"],
                                                        ["Conv5.conv.3"], ["Up5"], ["Up4", "Up3", "Up2"]]
        cuts[side] = cut
    # small images: the parameters (96% in Conv4 ... Up4) dominate, the bottleneck's second layer gets a stage to
    # itself (its first goes with the encoder); large ones: the full-resolution activations do, and the deep levels
    # share one stage
    assert UNITS.index("Conv5.conv.3") in cuts[128] and UNITS.index("Up5") in cuts[128]
    assert cuts[1024] != cuts[128]
    with pytest.raises(ValueError, match="example_input= .* or image_size="):
        parallel.pipeline_stages(model, 2)


def test_the_bottleneck_stays_whole_where_its_layers_cannot_run_apart():
    """A stage holding one bottleneck layer runs its modules, not the block: with a hook on the block (or a global
    module hook, which would see the halves) the balance keeps the block whole, a boundary inside it is an error
    naming the way out, and a stage already cut there refuses to run rather than skip the hook."""
    with torch.device("meta"):
        model = fastunet.U_Net(3, 1)
    second = UNITS.index("Conv5.conv.3")
    kwargs = dict(example_input=(1, 3, 128, 128), held_microbatches=[4, 3, 2, 1])
    assert parallel.pipeline_stages(model, 4, **kwargs)[1].first == second
    hook = model.Conv5.register_forward_hook(lambda *args: None)
    assert second not in [s.first for s in parallel.pipeline_stages(model, 4, **kwargs)]
    with pytest.raises(ValueError, match="cannot start at Conv5.conv.3 here: Conv5 or Conv5.conv has hooks"):
        parallel.pipeline_stages(model, 3, boundaries=("Conv5", "Conv5.conv.3"))
    with pytest.raises(ValueError, match="10 stages need 9 places to cut; 8 are allowed"):
        parallel.pipeline_stages(model, 10, image_size=64)
    hook.remove()
    model = fastunet.U_Net(3, 1)
    stages = parallel.pipeline_stages(model, 3, boundaries=("Conv5", "Conv5.conv.3"))
    skips = [torch.randn(2, c, 128 >> k, 128 >> k) for k, c in enumerate((64, 128, 256, 512))]
    assert stages[1](torch.randn(2, 512, 8, 8), *skips)[0].shape == (2, 1024, 8, 8)
    global_hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with pytest.raises(RuntimeError, match="runs one layer of the bottleneck block .* global module hook"):
            stages[1](torch.randn(2, 512, 8, 8), *skips)
    finally:
        global_hook.remove()


def _worst_stage(costs, cut):
    edges = (0, *cut, len(UNITS))
    return max(costs.stage(i, a, b) for i, (a, b) in enumerate(zip(edges, edges[1:])))


def _worst(costs, cut):
    edges = (0, *cut, len(costs))
    return max(sum(costs[a:b]) for a, b in zip(edges, edges[1:]))


def _all_cuts(n, stages):
    return itertools.combinations(range(1, n), stages - 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_stages=0), "units to cut"),
    (dict(num_stages=11), "units to cut"),
    (dict(num_stages=2, boundaries=("Conv5.conv.1",)), "must name"),
    (dict(num_stages=2, boundaries=("Conv1",)), "must name"),
    (dict(num_stages=3, boundaries=("Up5",)), "must name"),
    (dict(num_stages=3, boundaries=("Up5", "Conv3")), "forward order"),
    (dict(num_stages=2, balance="speed"), "balance must be"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel.pipeline_stages(fastunet.U_Net(3, 1), **kwargs)


def test_a_stage_given_the_wrong_inputs_says_what_it_takes():
    stages = parallel.pipeline_stages(fastunet.U_Net(3, 1), 2, boundaries=("Conv3",))
    with pytest.raises(ValueError, match="takes the input and 2 skip tensors"):
        stages[1](torch.randn(1, 128, 8, 8))
    with pytest.raises(TypeError, match="not a U_Net"):
        parallel.pipeline_stages(Reference(3, 1), 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        parallel.pipeline_stages(fastunet.U_Net(3, 1), 2, boundaries=("Conv5",))[1](
            torch.randn(1, 512, 1, 1), *(torch.randn(1, c, s, s) for c, s in ((64, 16), (128, 8), (256, 4), (512, 2))))


def test_an_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule must be one of gpipe, 1f1b, interleaved, zbv"):
        parallel.build_pipeline(fastunet.U_Net(3, 1), 4, None, schedule="dualpipe")


@pytest.fixture
def fake_rank():
    """``fake_rank(rank, world)``: this process as rank ``rank`` of a fake process group of ``world`` ranks (torch's
    "fake" backend: nothing is sent, so build_pipeline's choices can be read without other processes), torn down
    when the test ends."""
    from torch._C._distributed_c10d import FakeStore
    from torch.testing._internal.distributed import fake_pg  # noqa: F401  (registers the "fake" backend)

    def start(rank, world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


# (schedule, ranks, micro-batches, this rank): the stage indices it holds and the micro-batches each of the stages
# is counted to hold at once (GPipe: all; 1F1B: stage s of P holds min(M, P - s); two stages per rank: all)
MICROBATCH_CASES = [
    ("gpipe", 2, 3, 1, [1], [3, 3]),
    ("1f1b", 4, 4, 2, [2], [4, 3, 2, 1]),
    ("1f1b", 4, 6, 0, [0], [4, 3, 2, 1]),
    ("1f1b", 2, 5, 1, [1], [2, 1]),
    ("interleaved", 2, 6, 0, [0, 2], [6, 6, 6, 6]),
    ("interleaved", 2, 3, 1, [1, 3], [3, 3, 3, 3]),
    ("zbv", 2, 1, 1, [1, 2], [1, 1, 1, 1]),
    ("zbv", 4, 5, 0, [0, 7], [5] * 8),
]


@pytest.mark.parametrize("schedule, world, microbatches, rank, indices, held", MICROBATCH_CASES)
def test_each_schedule_gets_its_micro_batches(fake_rank, schedule, world, microbatches, rank, indices, held):
    fake_rank(rank, world)
    batch = torch.empty(2 * microbatches, 3, 32, 32, device="meta")
    with torch.device("meta"):
        model = fastunet.U_Net(3, 1)
    with mock.patch.object(parallel, "pipeline_stages", wraps=parallel.pipeline_stages) as stages:
        local = parallel.build_pipeline(model, microbatches, None, schedule=schedule, example_input=batch)
    assert type(local.schedule).__name__ == parallel.SCHEDULES[schedule].class_name
    assert local.schedule._n_microbatches == microbatches  # what its step splits the batch into
    assert local.indices == indices and len(local.modules) == len(indices)
    assert (local.first, local.last) == (0 in indices, len(held) - 1 in indices)
    (_, num_stages), kwargs = stages.call_args
    assert num_stages == len(held) and kwargs["held_microbatches"] == held
    assert tuple(kwargs["example_input"].shape) == (2, 3, 32, 32)  # one micro-batch, as the memory balance counts


@pytest.mark.parametrize("schedule, world, microbatches, batch, message", [
    ("gpipe", 2, 0, 4, "a positive integer; got 0"),
    ("zbv", 2, -2, 4, "a positive integer; got -2"),
    ("gpipe", 2, 2.0, 4, "a positive integer; got 2.0"),
    ("interleaved", 2, True, 4, "a positive integer; got True"),
    ("1f1b", 4, 3, 6, r"the 1f1b schedule needs at least as many micro-batches as stages \(4 on 4 ranks\); got 3"),
    ("1f1b", 2, 1, 4, r"at least as many micro-batches as stages \(2 on 2 ranks\); got 1"),
    ("interleaved", 2, 5, 10, r"max\(1, M // ranks\) rounds of equal size \(2 on 2 ranks\), which 5 micro-batches"),
    ("interleaved", 4, 9, 9, r"\(2 on 4 ranks\), which 9 micro-batches do not make; use a multiple of 4"),
    ("gpipe", 2, 3, 4, "N a multiple of the 3 micro-batches"),
])
def test_a_micro_batch_count_the_schedule_cannot_run_is_named_before_any_stage_is_built(
        fake_rank, schedule, world, microbatches, batch, message):
    fake_rank(0, world)
    with torch.device("meta"):
        model = fastunet.U_Net(3, 1)
    with mock.patch.object(parallel, "pipeline_stages", wraps=parallel.pipeline_stages) as stages, \
            pytest.raises(ValueError, match=message):
        parallel.build_pipeline(model, microbatches, None, schedule=schedule, example_input=(batch, 3, 32, 32))
    assert not stages.called and all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_materialize_builds_only_the_local_stages_as_the_constructor_would(memory_format):
    # A rank builds the U-Net on the meta device and materializes its own stages: the values (and layout) a CPU
    # construction from the same seed gives them, the RNG left where that construction leaves it, the other
    # stages' parameters and buffers never allocated.
    torch.manual_seed(5)
    want = fastunet.convert_sync_batchnorm(fastunet.U_Net(3, 2)).to(memory_format=memory_format)
    after = torch.rand(4)
    torch.manual_seed(5)
    with torch.device("meta"):
        model = fastunet.convert_sync_batchnorm(fastunet.U_Net(3, 2)).to(memory_format=memory_format)
    stages = parallel.pipeline_stages(model, 3, image_size=(64, 32))
    local = [stages[0], stages[2]]
    parallel.materialize(model, local)
    assert torch.equal(torch.rand(4), after)
    expected = want.state_dict()
    local_keys = {key for stage in local for key in stage.state_dict()}
    assert local_keys and local_keys != set(expected)
    for key, value in model.state_dict().items():
        if key in local_keys:
            assert not value.is_meta and torch.equal(value, expected[key]), key
            assert value.stride() == expected[key].stride(), key
        else:
            assert value.is_meta, key


def test_materialize_refuses_a_layer_it_cannot_initialise():
    with torch.device("meta"):
        model = fastunet.U_Net(3, 2)
    model.Conv_1x1 = torch.nn.Sequential(torch.nn.Conv2d(64, 2, 1)).to("meta")
    model.Conv_1x1.register_parameter("scale", torch.nn.Parameter(torch.ones(1, device="meta")))
    with pytest.raises(TypeError, match="a Sequential on the meta device has no reset_parameters"):
        parallel.materialize(model, parallel.pipeline_stages(model, 2, example_input=(1, 3, 32, 32)))

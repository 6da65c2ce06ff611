"""What users do to an nn.Module, done to fastunet.U_Net and to the seed U-Net alike: writes through ``.data``,
double backward, torch.func, hooks, swapped layers and blocks, pruning and parametrizations, frozen BatchNorm,
NaNs, mismatched dtypes, scripting. Exact mode must match the seed bit for bit, fast mode within the error rule
(tests/test_model.py); where the fused path cannot honour something, the block runs its own modules with one
warning naming why."""

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from helpers import (
    FLOAT32_SLACK,
    SIZE,
    assert_bitwise,
    assert_results_bitwise,
    assert_within_twice_reference_error,
    checked,
    pair,
    relative_error,
    seed_init_weights,
    train_step,
    well_conditioned,
)
from torch.func import functional_call, grad, jacrev, vmap

import fastunet
from fastunet.reference import U_Net as Reference


def models(exact, change=lambda m: None):
    """(seed U-Net, fastunet, float64 seed U-Net) with ``change`` applied to each, then the same well-conditioned
    state (the seed model's: new layers, pruning masks and parametrization buffers included)."""
    ref, model = pair(exact=exact)
    well_conditioned(ref, model)
    ref64 = copy.deepcopy(ref)
    for m in (ref, model, ref64):
        change(m)
    ref64.double()
    state = ref.state_dict()
    model.load_state_dict(state)
    ref64.load_state_dict(state)
    return ref, model, ref64


def batch(n=2):
    return torch.randn(n, 3, SIZE, SIZE), torch.randn(n, 2, SIZE, SIZE)


def assert_change_matches_seed(exact, change, steps=1):
    """assert_matches_seed on models with ``change`` applied, at fresh draws as ``checked`` says."""
    checked(exact, lambda: assert_matches_seed(exact, *models(exact, change), steps=steps))


def assert_step_matches(exact, got, want, ref64, x, g):
    """A fastunet training step's results against the seed's: bit for bit in exact mode, within the error rule
    against the float64 seed model's step on ``x``, ``g`` in fast mode."""
    if exact:
        assert_results_bitwise(got, want)
    else:
        assert_within_twice_reference_error(got, want, train_step(ref64, x.double(), g.double()))


def assert_matches_seed(exact, ref, model, ref64, steps=1):
    """Training steps (forward, backward, an SGD update) of both models, compared after each: bit for bit in exact
    mode, where the models' states evolve alike; in fast mode within the error rule against the float64 seed
    model, each step from the seed model's state (so that one step's rounding does not carry into the next)."""
    for _ in range(steps):
        x, g = batch()
        assert_step_matches(exact, train_step(model, x, g), train_step(ref, x, g), ref64, x, g)
        with torch.no_grad():
            for m in (ref, model, ref64):
                for p in m.parameters():
                    if p.grad is not None:
                        p.sub_(0.01 * p.grad)
        if not exact:
            model.load_state_dict(ref.state_dict())
            ref64.load_state_dict(ref.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# 1. Writes through .data are seen: nothing is cached between calls
# ----------------------------------------------------------------------------------------------------------------


def ema_update(teacher, student, decay=0.9):
    """A mean-teacher EMA as its users write it: through .data, which bumps no version counter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.data.mul_(decay).add_(s.data, alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.data.copy_(s.data)


DATA_WRITES = {
    "copy_": lambda m: m.Up4.up[1].weight.data.copy_(torch.randn_like(m.Up4.up[1].weight)),
    "running_mean.data.add_": lambda m: m.Conv3.conv[4].running_mean.data.add_(0.5),
    "running_var.data.mul_": lambda m: m.Up_conv2.conv[1].running_var.data.mul_(3.0),
    "bn weight .data =": lambda m: setattr(m.Conv5.conv[1].weight, "data", torch.rand(1024) + 0.5),
    "ema": lambda m: ema_update(m, fastunet.U_Net(3, 2)),
}


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("write", DATA_WRITES)
def test_eval_sees_writes_through_data(exact, write):
    """The BN scale/shift and sub-pixel weights are made at every call: after a write through ``.data`` (which
    bumps no version counter) eval gives what a newly built model with the same state gives."""
    torch.manual_seed(0)
    model = fastunet.U_Net(3, 2, exact=exact).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        DATA_WRITES[write](model)
        after = model(x)
        fresh = fastunet.U_Net(3, 2, exact=exact).eval()
        fresh.load_state_dict(model.state_dict())
        assert not torch.equal(after, before)
        assert_bitwise(after, fresh(x), f"eval output after {write}")
        if exact:
            ref = Reference(3, 2).eval()
            ref.load_state_dict(model.state_dict())
            assert_bitwise(after, ref(x), f"exact eval output after {write}")


def test_seed_init_weights_after_a_first_eval_call_is_seen():
    """The seed repository's init_weights writes ``m.weight.data``; a model that already ran in eval then runs the
    new weights (it used to keep BN-folded weights keyed on version counters that .data writes do not bump)."""
    model = fastunet.U_Net(3, 2).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model(x)
        seed_init_weights(model, "kaiming")
        fresh = fastunet.U_Net(3, 2).eval()
        fresh.load_state_dict(model.state_dict())
        after = model(x)
        assert not torch.equal(after, before)
        assert_bitwise(after, fresh(x), "eval output after init_weights")


# ----------------------------------------------------------------------------------------------------------------
# 2. Double backward
# ----------------------------------------------------------------------------------------------------------------


def gradient_penalty_step(model, x, dtype=None):
    """An R1-style step: loss = mean(D(x)) + ||d sum(D(x)^2) / dx||^2, backward through the input gradient.
    Returns the input gradient of the first backward and every parameter gradient (copies)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().to(dtype or x.dtype).requires_grad_()
    out = model(x)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (out.mean() + gx.pow(2).sum()).backward()
    return gx.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_matches_the_seed(exact, training):
    """A gradient penalty through fastunet: the input gradient and every parameter gradient within the error rule
    of the seed's against float64 (exact mode's first derivative is the seed's bit for bit; its second-order terms
    are summed in another order, as the fused block is one autograd node)."""

    def check():
        ref, model, ref64 = models(exact)
        for m in (ref, model, ref64):
            m.train(training)
        x = batch()[0]
        (gx, grads), (gx_ref, grads_ref) = gradient_penalty_step(model, x), gradient_penalty_step(ref, x)
        gx64, grads64 = gradient_penalty_step(ref64, x, torch.float64)
        if exact:
            assert_bitwise(gx, gx_ref, "input gradient")
        assert relative_error(gx, gx64) <= 2 * relative_error(gx_ref, gx64) + 1e-7
        total = torch.cat([g.flatten() for g in grads64.values()]).norm().item()
        for name, g64 in grads64.items():
            bound = max(2 * (grads_ref[name].double() - g64).norm().item(), 1e-6 * total)
            assert (grads[name].double() - g64).norm().item() <= bound, name

    checked(exact, check)


# ----------------------------------------------------------------------------------------------------------------
# 3. torch.func
# ----------------------------------------------------------------------------------------------------------------


def func_grad(model, x):
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    return grad(lambda p: functional_call(model, (p, buffers), (x,)).pow(2).sum())(params)


@pytest.mark.parametrize("exact", [False, True])
def test_torch_func_grad(exact):
    """torch.func.grad over functional_call runs the fused Functions (forward + setup_context) and gives the seed's
    gradients (in eval: BatchNorm's in-place running-stats update is a captured mutation under torch.func, in the
    seed as here)."""

    def check():
        ref, model, ref64 = models(exact)
        for m in (ref, model, ref64):
            m.eval()
        x = batch()[0]
        got, want, want64 = func_grad(model, x), func_grad(ref, x), func_grad(ref64, x.double())
        for name in want:
            if exact:
                assert_bitwise(got[name], want[name], name)
            else:
                assert relative_error(got[name], want64[name]) <= 2 * relative_error(want[name], want64[name]) + 1e-7

    checked(exact, check)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_torch_func_grad_over_the_parameters_alone(exact, training):
    """torch.func.grad over functional_call given the parameters alone (the buffers captured): in eval the seed's
    gradients (fast mode once returned a saved input as an output, which torch.func refuses); in training the
    seed's own error, BatchNorm's running-stats update being a captured mutation."""

    def func_grad_of_parameters(m, x):
        params = {name: p.detach() for name, p in m.named_parameters()}
        return grad(lambda p: functional_call(m, p, (x,)).pow(2).sum())(params)

    def check():
        ref, model, ref64 = models(exact)
        for m in (ref, model, ref64):
            m.train(training)
        x = batch()[0]
        if training:
            for m in (ref, model):
                with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
                    func_grad_of_parameters(m, x)
            return
        got, want, want64 = (func_grad_of_parameters(m, t) for m, t in ((model, x), (ref, x), (ref64, x.double())))
        for name in want:
            if exact:
                assert_bitwise(got[name], want[name], name)
            else:
                assert relative_error(got[name], want64[name]) <= (2 * relative_error(want[name], want64[name])
                                                                   + FLOAT32_SLACK), name

    checked(exact, check)


@pytest.mark.parametrize("exact", [False, True])
def test_torch_func_jacrev(exact):
    """jacrev (vjp, then vmap over the backward) through the fused Functions: the seed's Jacobian, bit for bit in
    exact mode, within the error rule against float64 in fast mode."""

    def check():
        ref, model, ref64 = models(exact)
        for m in (ref, model, ref64):
            m.eval()
        x = torch.randn(2, 3, SIZE, SIZE)
        jac, jac_ref, jac64 = (jacrev(lambda t, m=m: m(t).sum((0, 2, 3)))(t)
                               for m, t in ((model, x), (ref, x), (ref64, x.double())))
        assert jac.shape == (2, 2, 3, SIZE, SIZE)
        if exact:
            assert_bitwise(jac, jac_ref, "Jacobian")
        assert relative_error(jac, jac64) <= 2 * relative_error(jac_ref, jac64) + 1e-7

    checked(exact, check)


@pytest.mark.parametrize("exact", [False, True])
def test_vmap_runs_the_blocks_own_modules_with_one_warning(exact, fresh_warnings):
    ref, model = pair(exact=exact)
    for m in (ref, model):
        m.eval()
    x = torch.randn(3, 2, 3, SIZE, SIZE)
    assert_bitwise(vmap(model)(x), vmap(ref)(x), "vmap output")
    assert_bitwise(vmap(model)(x), vmap(ref)(x), "vmap output, again")
    seen = fresh_warnings()
    assert len(seen) == 1 and "torch.func.vmap" in seen[0], seen


def test_forward_mode_ad_runs_the_blocks_own_modules():
    ref, model = pair(exact=True)
    for m in (ref, model):
        m.eval()
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE)
    got, want = torch.func.jvp(model, (x,), (t,)), torch.func.jvp(ref, (x,), (t,))
    assert_bitwise(got[1], want[1], "jvp tangent")


# ----------------------------------------------------------------------------------------------------------------
# 4. Hooks
# ----------------------------------------------------------------------------------------------------------------


def hooked_run(model, names, hook_factory, x, g):
    """Registers ``hook_factory(name, log)`` as a forward hook on each named submodule, runs a training step on
    ``x`` and ``g`` and returns (the step's results, the log of what the hooks saw)."""
    log = []
    handles = [model.get_submodule(n).register_forward_hook(hook_factory(n, log)) for n in names]
    try:
        return train_step(model, x, g), log
    finally:
        for h in handles:
            h.remove()


def recording_hook(name, log):
    def hook(module, inputs, output):
        log.append((name, [t.detach().clone() for t in inputs], output.detach().clone()))

    return hook


INNER_LAYERS = ["Conv2.conv.0", "Conv3.conv.1", "Up_conv3.conv.5", "Up2.up.0", "Up4.up.2", "Maxpool", "Conv4",
                "Up5", "Conv_1x1"]


@pytest.mark.parametrize("exact", [False, True])
def test_forward_hooks_see_what_they_see_on_the_seed(exact):
    """Forward hooks on layers inside blocks, on the max-pool, on an encoder block and on an up block fire as often
    and see the same inputs and outputs as on the seed (Conv4: its output alone, not the concat buffer and pool;
    Up5: the up-conv's output, not the concat buffer)."""

    def check():
        ref, model, ref64 = models(exact)
        x, g = batch()
        (got, seen), (want, seen_ref) = (hooked_run(m, INNER_LAYERS, recording_hook, x, g) for m in (model, ref))
        assert [s[0] for s in seen] == [s[0] for s in seen_ref]
        assert sum(s[0] == "Maxpool" for s in seen) == 4
        for (name, inputs, output), (_, inputs_ref, output_ref) in zip(seen, seen_ref):
            assert output.shape == output_ref.shape and len(inputs) == len(inputs_ref), name
            if exact:
                assert_bitwise(output, output_ref, f"{name} output")
                for a, b in zip(inputs, inputs_ref):
                    assert_bitwise(a, b, f"{name} input")
            else:
                torch.testing.assert_close(output, output_ref, rtol=1e-4, atol=1e-4)
        assert_step_matches(exact, got, want, ref64, x, g)

    checked(exact, check)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("where", ["Conv4", "Up5", "Conv3.conv.2", "Up3.up.3", "Maxpool"])
def test_a_hook_that_returns_a_new_output_is_honoured(exact, where):
    """Deep-supervision and feature-editing hooks return a new output: the rest of the network must use it."""

    def change(m):
        m.get_submodule(where).register_forward_hook(lambda module, inputs, output: output * 0.5 + 0.25)

    assert_change_matches_seed(exact, change)


@pytest.mark.parametrize("exact", [False, True])
def test_forward_pre_hook_and_full_backward_hooks(exact):
    """A pre-hook that changes a block's input, full backward hooks (Grad-CAM) on an encoder block and on a layer:
    same results, and the backward hooks see the seed's gradients."""
    grads = {}

    def change(m):
        m.Conv3.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
        for name in ("Conv4", "Up_conv2.conv.3"):
            m.get_submodule(name).register_full_backward_hook(
                lambda module, gin, gout, name=name: grads.setdefault(id(m), []).append(
                    (name, gout[0].detach().clone())))

    def check():
        grads.clear()
        ref, model, ref64 = models(exact, change)
        x, g = batch()
        got, want = train_step(model, x, g), train_step(ref, x, g)
        seen, seen_ref = grads[id(model)], grads[id(ref)]
        assert [s[0] for s in seen] == [s[0] for s in seen_ref] == ["Up_conv2.conv.3", "Conv4"]
        for (name, a), (_, b) in zip(seen, seen_ref):
            if exact:
                assert_bitwise(a, b, f"gradient seen by the backward hook of {name}")
            else:
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
        assert_step_matches(exact, got, want, ref64, x, g)

    checked(exact, check)


def test_global_module_hooks_fire_on_every_layer(fresh_warnings):
    ref, model = pair(exact=True)
    calls = {}
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: calls.setdefault(type(module).__name__, []).append(output.shape))
    try:
        x, g = batch()
        got = train_step(model, x, g)
        counted, calls = calls, {}
        want = train_step(ref, x, g)
    finally:
        handle.remove()
    assert counted == calls
    assert_results_bitwise(got, want)
    seen = fresh_warnings()
    assert len(seen) == 1 and "global module hooks" in seen[0], seen


# ----------------------------------------------------------------------------------------------------------------
# 5. Swapped layers and blocks
# ----------------------------------------------------------------------------------------------------------------


def swap(path, make):
    def change(m):
        parent, _, name = path.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, name, make())

    return change


SWAPS = {
    "LeakyReLU": swap("Conv2.conv.2", lambda: nn.LeakyReLU(0.2)),
    "Identity after an up-conv": swap("Up3.up.3", nn.Identity),
    "AvgPool2d": swap("Maxpool", lambda: nn.AvgPool2d(2)),
    "bilinear upsample": swap("Up4.up.0", lambda: nn.Upsample(scale_factor=2, mode="bilinear")),
    "GroupNorm": swap("Up_conv4.conv.4", lambda: nn.GroupNorm(8, 256)),
    "dilated conv": lambda m: setattr(m.Conv3.conv[3], "dilation", (2, 2))
    or setattr(m.Conv3.conv[3], "padding", (2, 2)),
    "Dropout appended": lambda m: m.Up_conv3.conv.append(nn.Dropout2d(0.0)),
    "seed block": lambda m: setattr(m, "Conv3", _copy_into(Reference(3, 2).Conv3, m.Conv3)),
    "BN momentum None, eps 1e-3": lambda m: [setattr(b, "momentum", None) or setattr(b, "eps", 1e-3)
                                             for b in m.modules() if isinstance(b, nn.BatchNorm2d)],
    "conv without bias": lambda m: setattr(m.Conv2.conv[0], "bias", None),
}


def _copy_into(block, like):
    block.load_state_dict(like.state_dict())
    return block


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("swapped", SWAPS)
def test_swapped_layers_and_blocks_run_as_on_the_seed(exact, swapped):
    assert_change_matches_seed(exact, SWAPS[swapped])


def test_a_swapped_layer_warns_once_naming_it(fresh_warnings):
    _, model, _ = models(False, SWAPS["LeakyReLU"])
    for _ in range(2):
        train_step(model, *batch())
    seen = fresh_warnings()
    assert len(seen) == 1, seen
    assert "conv_block(64 -> 128)" in seen[0] and "conv[2] is a LeakyReLU, not an nn.ReLU" in seen[0]


@pytest.mark.parametrize("exact", [False, True])
def test_frozen_batchnorm_in_a_training_model(exact):
    """Fine-tuning with BatchNorm frozen (BN layers in eval while the model trains): running stats, not batch
    statistics, and no running-stats update, as in the seed."""

    def freeze(m):
        m.train()
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.eval()
        with torch.no_grad():
            for b in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d)):
                b.running_var.fill_(1.7)
                b.running_mean.fill_(-0.2)

    def check():
        ref, model, ref64 = models(exact, freeze)
        before = {n: b.clone() for n, b in model.named_buffers()}
        assert_matches_seed(exact, ref, model, ref64)
        for name, b in model.named_buffers():
            assert torch.equal(b, before[name]), name

    checked(exact, check)


# ----------------------------------------------------------------------------------------------------------------
# 6. Pruning and parametrizations
# ----------------------------------------------------------------------------------------------------------------


class Positive(nn.Module):
    def forward(self, w):
        return w.abs() * 0.5


PARAMETRIZED = {
    "l1_unstructured pruning": lambda m: prune.l1_unstructured(m.Conv2.conv[0], "weight", 0.5),
    "random pruning of an up-conv bias": lambda m: prune.random_unstructured(m.Up3.up[1], "bias", 0.3),
    "weight_norm (parametrization)": lambda m: nn.utils.parametrizations.weight_norm(m.Conv3.conv[3]),
    "spectral_norm (parametrization)": lambda m: nn.utils.parametrizations.spectral_norm(m.Up4.up[1]),
    "weight_norm (old hook)": lambda m: nn.utils.weight_norm(m.Up_conv3.conv[0]),
    "register_parametrization on a BN weight": lambda m: parametrize.register_parametrization(
        m.Conv4.conv[4], "weight", Positive()),
}


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("how", PARAMETRIZED)
def test_pruning_and_parametrizations(exact, how):
    """Pruning adds a forward pre-hook that remakes the weight at every call; parametrizations remake it at every
    read: two training steps (the second used to fail, "Trying to backward through the graph a second time") and an
    eval call, as on the seed."""
    def check():
        ref, model, ref64 = models(exact, PARAMETRIZED[how])
        assert_matches_seed(exact, ref, model, ref64, steps=2)
        x = batch()[0]
        with torch.no_grad():
            ref.eval(), model.eval(), ref64.eval()
            if exact:
                assert_bitwise(model(x), ref(x), "eval output")
            else:
                want64 = ref64(x.double())
                assert relative_error(model(x), want64) <= 2 * relative_error(ref(x), want64) + 1e-7

    checked(exact, check)


def test_parametrized_layers_stay_fused():
    """A parametrized conv or BN weight is read once per call, as its layer's forward reads it: the block stays
    fused (no warning), and a spectral-norm power iteration advances once per training step, as in the seed."""
    ref, model, _ = models(False, lambda m: (nn.utils.parametrizations.spectral_norm(m.Up4.up[1]),
                                             nn.utils.parametrizations.weight_norm(m.Conv2.conv[3])))
    x, g = batch()
    assert fastunet.model.fused_refusal(model.Up4, torch.randn(2, 128, 8, 8)) is None
    assert fastunet.model.fused_refusal(model.Conv2, x) is None
    train_step(model, x, g)
    train_step(ref, x, g)
    u = model.Up4.up[1].parametrizations.weight[0]._u
    ref_u = ref.Up4.up[1].parametrizations.weight[0]._u
    assert not torch.equal(u, ref_u.new_zeros(ref_u.shape))
    torch.testing.assert_close(u, ref_u, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 7. NaNs, dtypes, scripting
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [False, True])
def test_a_nan_in_a_training_batch_poisons_the_running_stats_as_in_the_seed(exact):
    ref, model = pair(exact=exact)
    x, g = batch()
    x[1, 0, 5, 7] = float("nan")
    got, want = train_step(model, x, g), train_step(ref, x, g)
    for name, b in want[3].items():
        assert torch.equal(got[3][name].isnan(), b.isnan()), name
    assert want[3]["Conv1.conv.1.running_var"].isnan().all()
    assert got[0].isnan().all() and want[0].isnan().all()


def test_a_float16_input_into_a_float32_model_says_what_to_do():
    ref, model = pair(exact=False)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=re.escape("Input type (torch.float16) and weight type (torch.float32) "
                                                     "should be the same")) as error:
        model(x)
    assert "torch.autocast" in str(error.value) and "x.to(torch.float32)" in str(error.value)
    with pytest.raises(RuntimeError):
        ref(x)  # the seed fails too
    with pytest.raises(RuntimeError, match="should be the same"):
        model.Conv2(torch.randn(2, 64, 8, 8, dtype=torch.bfloat16))  # a block alone says the same
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # under autocast, any float input is cast


@pytest.mark.parametrize("target", ["model", "block"])
def test_torch_jit_script_says_it_is_not_supported_and_what_works(target):
    model = fastunet.U_Net(3, 2)
    module = model if target == "model" else model.Conv2
    for _ in range(2):  # a second try says the same (it used to fail with "Can't redefine method")
        with pytest.raises(RuntimeError, match="torch.jit.script") as error:
            torch.jit.script(module)
        assert "torch.jit.trace" in str(error.value) and "torch.export" in str(error.value)
    traced = torch.jit.trace(model.eval(), torch.randn(1, 3, SIZE, SIZE))
    x = torch.randn(2, 3, SIZE, SIZE)
    ref = Reference(3, 2).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_bitwise(traced(x), ref(x), "traced output")

"""What U-Net users trip over, as tested behaviours: fallbacks with one warning, determinism, BatchNorm
fidelity, the seed's init_weights, DataParallel/DDP checkpoints, activation checkpointing, padding to a
multiple of 16, and packaging hygiene."""

import copy
import os
import re
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import torch
from helpers import (
    REPO,
    SIZE,
    assert_deterministic_run_to_run,
    assert_results_bitwise,
    pair,
    relative_error,
    seed_init_weights,
    train_step,
)

import fastunet
from fastunet import ops
from fastunet.reference import U_Net as Reference


def test_float64_falls_back_with_one_warning(fresh_warnings):
    ref = Reference(3, 2).double()
    model = fastunet.U_Net(3, 2).double()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    for _ in range(2):
        assert torch.equal(model(x), ref(x))
    seen = fresh_warnings()
    assert len(seen) == 1 and "torch.float64 input runs the pure-PyTorch path" in seen[0], seen


def test_unsupported_layer_falls_back_with_one_warning(fresh_warnings):
    ref, model = pair(exact=True)
    for m in (ref, model):
        m.Conv2.conv[0].padding_mode = "reflect"  # a conv the fused blocks do not take
    x, g = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 2, SIZE, SIZE)
    for _ in range(2):
        assert_results_bitwise(train_step(model, x, g), train_step(ref, x, g))
    seen = fresh_warnings()
    assert len(seen) == 1, seen
    assert "conv_block(64 -> 128) runs its own modules" in seen[0] and "padding_mode='reflect'" in seen[0]


@pytest.mark.parametrize("exact", [False, True])
def test_deterministic_run_to_run(exact):
    _, model = pair(exact=exact)
    assert_deterministic_run_to_run(model, torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 2, SIZE, SIZE))


@pytest.mark.parametrize("exact", [False, True])
def test_batchnorm_fidelity_momentum_none_and_num_batches_tracked(exact):
    """momentum=None (cumulative average), the unbiased running variance and num_batches_tracked, over
    three steps: exact mode bit for bit, fast mode to float32 rounding."""
    ref, model = pair(exact=exact)
    for m in (ref, model):
        for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.momentum = None
    for _ in range(3):
        x, g = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 2, SIZE, SIZE)
        got, want = train_step(model, x, g), train_step(ref, x, g)
    for name, buffer in want[3].items():
        if exact or name.endswith("num_batches_tracked"):
            assert torch.equal(got[3][name], buffer), name
        else:
            assert relative_error(got[3][name], buffer) < 1e-5, name
    assert int(model.Conv1.conv[1].num_batches_tracked) == 3


@pytest.mark.parametrize("exact", [False, True])
def test_empty_batch_in_training_leaves_running_stats_untouched(exact):
    ref, model = pair(exact=exact)
    before = copy.deepcopy(model.state_dict())
    model.train()
    out = model(torch.randn(0, 3, SIZE, SIZE))
    ref(torch.randn(0, 3, SIZE, SIZE))
    assert out.shape == (0, 2, SIZE, SIZE)
    for name, value in model.state_dict().items():
        if "running" in name:
            assert torch.equal(value, before[name]), name
        assert torch.equal(value, ref.state_dict()[name]), name  # num_batches_tracked counts, as in nn


@pytest.mark.parametrize("init_type", ["normal", "kaiming"])
def test_seed_init_weights_initialises_fastunet_as_the_reference(init_type):
    torch.manual_seed(7)
    ref = Reference(3, 1)
    seed_init_weights(ref, init_type)
    torch.manual_seed(7)
    model = fastunet.U_Net(3, 1)
    seed_init_weights(model, init_type)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(model.Up5.up[1].bias, torch.zeros(512))  # the init ran: conv biases are zero,
    assert not torch.equal(model.Up5.up[2].weight, torch.ones(512))  # BN weights drawn around 1


def test_dataparallel_checkpoint_loads_with_the_documented_one_liner():
    ref = Reference(3, 1)
    saved = torch.nn.DataParallel(ref).state_dict()  # keys "module.Conv1.conv.0.weight", ...
    assert all(k.startswith("module.") for k in saved)
    model = fastunet.U_Net(3, 1)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(saved)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(saved, "module.")  # the README's one-liner
    model.load_state_dict(saved)
    for name, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("exact", [True, False])
def test_checkpointing_gives_the_same_bits_and_keeps_fewer_activations(exact):
    """checkpointing=True: outputs, gradients and BN buffers (updated once per step) bit for bit as without
    it, over two steps; and autograd keeps fewer bytes of activations between forward and backward."""
    _, plain = pair(exact=exact)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = True
    for _ in range(2):
        x, g = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 2, SIZE, SIZE)
        assert_results_bitwise(train_step(checkpointed, x, g), train_step(plain, x, g))

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total[0]

    assert saved_bytes(checkpointed) < 0.5 * saved_bytes(plain)


@pytest.mark.parametrize("exact", [True, False])
def test_checkpointing_a_block_on_its_own_modules_moves_its_bn_stats_once(exact):
    """A block that runs its own modules (a hook on one of its BNs) under checkpointing: its recomputation in
    backward must not move the running stats or the batch count a second time."""
    _, plain = pair(exact=exact)
    for model in (plain, checkpointed := copy.deepcopy(plain)):
        model.Conv2.conv[1].register_forward_hook(lambda *args: None)
    checkpointed.checkpointing = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the block's fallback warning
        for _ in range(2):
            x, g = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, 2, SIZE, SIZE)
            assert_results_bitwise(train_step(checkpointed, x, g), train_step(plain, x, g))
    assert int(checkpointed.Conv2.conv[1].num_batches_tracked) == 2


@pytest.mark.parametrize("exact", [True, False])
def test_pad_to_multiple_pads_and_crops(exact):
    ref, model = pair(exact=exact)
    model.pad_to_multiple = True
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 40, 50)
    with torch.no_grad():
        out = model(x)
        want = ref(torch.nn.functional.pad(x, (0, 14, 0, 8)))[:, :, :40, :50]
    assert out.shape == (2, 2, 40, 50)
    if exact:
        assert torch.equal(out, want)
    else:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pad_to_multiple=True"):
        fastunet.U_Net(3, 2)(x)


def test_no_torch_pin_in_the_install_requirements():
    for name in ("pyproject.toml", "setup.py"):
        with open(os.path.join(REPO, name)) as f:
            assert not re.search(r"torch\s*==", f.read()), name


def test_importing_fastunet_changes_no_global_torch_setting():
    script = (
        "import torch\n"
        "def settings():\n"
        "    return (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),\n"
        "            torch.is_grad_enabled(), torch.get_num_threads(), torch.get_float32_matmul_precision(),\n"
        "            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,\n"
        "            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,\n"
        "            torch.random.get_rng_state().sum().item(), torch.is_anomaly_enabled())\n"
        "before = settings()\n"
        "import sys, fastunet, fastunet.bench, fastunet.parallel, fastunet.train\n"
        "assert 'torch._dynamo' not in sys.modules  # about 3 s of import, paid where torch.compile runs\n"
        "import fastunet.kernels\n"
        "after = settings()\n"
        "assert before == after, (before, after)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_compile_constant_mark_is_torch_compiler_s():
    """fastunet marks its compile-time constants without importing Dynamo (ops.constant_for_compile): the mark is the
    one torch.compiler.assume_constant_result sets, made by that function where Dynamo is loaded."""
    import torch._dynamo  # noqa: F401

    def reference():
        pass

    def loaded():
        pass

    def unloaded():
        pass

    torch.compiler.assume_constant_result(reference)
    assert vars(reference)
    with mock.patch.object(torch.compiler, "assume_constant_result", wraps=torch.compiler.assume_constant_result) as f:
        ops.constant_for_compile(loaded)
        with mock.patch.dict(sys.modules):
            del sys.modules["torch._dynamo"]
            ops.constant_for_compile(unloaded)
    assert f.call_count == 1
    assert vars(loaded) == vars(unloaded) == vars(reference)

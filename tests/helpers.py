"""What the test files share: the reference/fastunet pair and its training step, the bit-for-bit and 2x-error
assertions, the seed repository's init_weights, the op inputs of the CPU and CUDA op tests, and the spawning of
process-group ranks."""

import contextlib
import copy
import datetime
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.init as init

import fastunet
from fastunet import ops
from fastunet.reference import U_Net as Reference
from fastunet.testing import relative_error  # noqa: F401  (the test files import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = 32  # H = W: the smallest size with a 2x2 bottleneck


def pair(exact, img_ch=3, output_ch=2):
    """(seed U-Net, fastunet.U_Net) on the CPU with the same freshly drawn state. The fastunet model is built on the
    meta device and takes the seed model's state: one random init (a 31M-parameter draw, 0.3 s here), not two."""
    ref = Reference(img_ch, output_ch)
    with torch.device("meta"):
        fast = fastunet.U_Net(img_ch, output_ch, exact=exact)
    fast.to_empty(device="cpu").load_state_dict(ref.state_dict())
    return ref, fast


def train_step(model, x, grad_out, dtype=None, autocast=None):
    """Forward + backward; returns output, input grad, parameter grads, buffers (copies)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(x)
    (out.to(grad_out.dtype) * grad_out).sum().backward()
    module = getattr(model, "_orig_mod", model)  # a torch.compile'd module's names are its module's
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3e}"


def assert_results_bitwise(got, want):
    """Output, input gradient, every parameter gradient and every buffer of two train_step results."""
    assert_bitwise(got[0], want[0], "output")
    assert_bitwise(got[1], want[1], "input gradient")
    for name in want[2]:
        assert_bitwise(got[2][name], want[2][name], f"grad of {name}")
    for name in want[3]:
        assert_bitwise(got[3][name], want[3][name], f"buffer {name}")


def served_from_threads(call, inputs, threads=4):
    """``[call(x) for x in inputs]`` made by ``threads`` threads at once (started together, each taking every
    ``threads``-th input)."""
    got = [None] * len(inputs)
    start = threading.Barrier(threads)

    def serve(first):
        start.wait()
        for i in range(first, len(inputs), threads):
            got[i] = call(inputs[i])

    workers = [threading.Thread(target=serve, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return got


def well_conditioned(*models):
    """BN shifts of about 2.5: almost no pre-ReLU value lies within rounding of 0.

    Near zero, one ReLU mask (or max-pool argmax) flipping between float32 and float64 moves a gradient by
    far more than any rounding, at random in the reference and in fastunet alike; the 2x rule judges the
    arithmetic, so it is checked where no such flip happens. (Masks and ties are tested bit for bit in
    exact mode and per op.)
    """
    shifts = None
    for m in models:
        bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        if shifts is None:
            shifts = [2.5 + 0.5 * torch.rand(b.num_features) for b in bns]
        with torch.no_grad():
            for bn, shift in zip(bns, shifts):
                bn.bias.copy_(shift)


def eval_models(output_ch=2):
    """(seed U-Net, fastunet.U_Net, float64 seed U-Net) in eval, well conditioned, with the same weights and running
    stats away from (0, 1)."""
    ref, fast = pair(exact=False, output_ch=output_ch)
    well_conditioned(ref, fast)
    with torch.no_grad():
        for bn in (b for b in ref.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.num_features) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
    fast.load_state_dict(ref.state_dict())
    return ref.eval(), fast.eval(), copy.deepcopy(ref).double().eval()


def conv_bias_before_bn(name):
    return name.endswith(("conv.0.bias", "conv.3.bias", "up.1.bias"))


def pool_tie_free(ref64, draw, tolerance=2e-6, attempts=20):
    """The first input ``draw()`` gives at which no 2x2 max-pool window of the float64 reference ``ref64`` (the
    outputs of its encoder blocks Conv1-Conv4) holds its two largest values within ``tolerance`` of each other,
    relatively.

    The max-pool's counterpart of well_conditioned: such a near-tie resolves either way under any re-association
    (a conv's float32 rounding is about 1e-6 relative here), and its gradient then reaches another input pixel, far
    beyond rounding: the flip moves with the seed, a bug does not. Some 120,000 windows of a 4 x 3 x 32^2 batch hold
    about half a tie at this tolerance on average, so a few draws suffice.
    """
    probe = copy.deepcopy(ref64)  # its forward passes move BatchNorm's running stats
    tops = []
    for name in ("Conv1", "Conv2", "Conv3", "Conv4"):
        getattr(probe, name).register_forward_hook(lambda module, args, out: tops.append(out.detach()))
    for _ in range(attempts):
        x = draw()
        tops.clear()
        with torch.no_grad():
            probe(x.double())
        if all(smallest_pool_gap(t) > tolerance for t in tops):
            return x
    raise AssertionError(f"no input without a max-pool near-tie in {attempts} draws")


def smallest_pool_gap(t):
    """The smallest gap between the two largest values of a 2x2 max-pool window of ``t`` ``[N, C, H, W]``, relative
    to the largest."""
    n, c, h, w = t.shape
    windows = t[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).transpose(3, 4).reshape(-1, 4)
    top2 = windows.topk(2, dim=1).values
    return ((top2[:, 0] - top2[:, 1]) / top2[:, 0].abs().clamp_min(1e-30)).min().item()


# The error rule's slack, relative to each tensor's float64 norm: 4 units of float32 rounding (2^-24). Storing a
# float64 tensor in float32 alone moves it by up to 1 unit of its norm, and a BN running stat or a shallow gradient
# comes out of a few such roundings, so its reference error can be ~0.5-1 unit on one CPU and its fast-mode error
# ~2 units on another, whatever the arithmetic: 4 units absorb that, and no more. It is far below what a bug does:
# a 1e-5 relative change of one weight is 40x the slack (test_the_error_rule_catches_a_1e5_change_of_one_weight).
FLOAT32_SLACK = 4 * 2.0 ** -24


def assert_within_twice_reference_error(fast_result, ref_result, exact_result, slack=FLOAT32_SLACK):
    """flash-attention's rule: error(fast, float64) <= 2 * error(float32 reference, float64) + slack, the errors
    relative to the float64 tensor's norm (FLOAT32_SLACK: float32 rounding of that norm).

    Conv biases feeding a training-mode BN have a zero gradient in exact arithmetic (their float values are
    rounding noise): they are held to an absolute bound scaled by the whole gradient's norm.
    """
    out_f, gx_f, grads_f, bufs_f = fast_result
    out_r, gx_r, grads_r, bufs_r = ref_result
    out_e, gx_e, grads_e, bufs_e = exact_result
    assert relative_error(out_f, out_e) <= 2 * relative_error(out_r, out_e) + slack
    assert relative_error(gx_f, gx_e) <= 2 * relative_error(gx_r, gx_e) + slack
    total = torch.cat([g.double().flatten() for g in grads_e.values()]).norm().item()
    for name, g_e in grads_e.items():
        if conv_bias_before_bn(name):
            bound = max(2 * (grads_r[name].double() - g_e).norm().item(), 1e-6 * total)
            assert (grads_f[name].double() - g_e).norm().item() <= bound, name
        else:
            assert relative_error(grads_f[name], g_e) <= 2 * relative_error(grads_r[name], g_e) + slack, name
    for name, b_e in bufs_e.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(bufs_f[name], b_e), name
        else:
            assert relative_error(bufs_f[name], b_e) <= 2 * relative_error(bufs_r[name], b_e) + slack, name


def checked(exact, check, draws=3):
    """Runs ``check()``, which draws fresh models and batches. In fast mode a failure must repeat at every one of
    ``draws`` fresh draws to fail the test: a ReLU or max-pool near-tie that flips between float32 and float64 moves
    with the draw (and sends one tensor's error to ~1e-4), a bug does not. Exact mode is bit for bit: once. A failed
    draw's models are freed before the next one runs: only its message is kept, not its traceback's frames."""
    failures = []
    for _ in range(1 if exact else draws):
        try:
            check()
            return
        except AssertionError as failure:
            if exact:
                raise
            failures.append(f"{type(failure).__name__}: {failure}")
        gc.collect()
    raise AssertionError(f"failed at each of {draws} fresh draws: " + " | ".join(failures))


# oneDNN and MKL capped at AVX2 (both read these at start-up): on any CPU with AVX2, the kernels an AVX2-only CPU runs.
AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def ran_under_avx2_kernels(request):
    """For a test of a choice that fastunet.conv.policy makes where oneDNN's kernels are AVX2-class, judged against
    the seed U-Net on such a CPU: on an AVX-512 CPU (where the seed's oneDNN convs are more accurate, and the policy
    chooses otherwise) the test runs in a pytest subprocess under AVX2_CAPS, which the seed then runs under too, and
    this returns True for the caller to return; elsewhere it returns False and the test runs here."""
    from fastunet.conv import policy

    if policy.onednn_isa() != "avx512":
        return False
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                         cwd=REPO, env={**os.environ, **AVX2_CAPS}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"under {AVX2_CAPS}:\n{run.stdout[-6000:]}"
    return True


def assert_deterministic_run_to_run(model, x, g):
    """Under torch.use_deterministic_algorithms(True) two training steps give the same bits (forward, backward,
    buffers)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = train_step(copy.deepcopy(model), x, g)
        second = train_step(copy.deepcopy(model), x, g)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_results_bitwise(second, first)


def seed_init_weights(net, init_type="normal", gain=0.02):
    """The seed repository's init_weights, as its users call it: submodules matched by class name."""

    def init_func(m):
        classname = m.__class__.__name__
        if hasattr(m, "weight") and (classname.find("Conv") != -1 or classname.find("Linear") != -1):
            {"normal": lambda w: init.normal_(w, 0.0, gain), "xavier": lambda w: init.xavier_normal_(w, gain=gain),
             "kaiming": lambda w: init.kaiming_normal_(w, a=0, mode="fan_in"),
             "orthogonal": lambda w: init.orthogonal_(w, gain=gain)}[init_type](m.weight.data)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
        elif classname.find("BatchNorm2d") != -1:
            init.normal_(m.weight.data, 1.0, gain)
            init.constant_(m.bias.data, 0.0)

    net.apply(init_func)


def random(*shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    return (torch.randn(shape, dtype=dtype) * 2 + 0.5).contiguous(memory_format=memory_format)


def case(upscale, n=2, c=3, h=4, w=6, dtype=torch.float32, memory_format=torch.contiguous_format, values=random):
    z = values(n, upscale * upscale * c, h + upscale - 1, w + upscale - 1, dtype=dtype, memory_format=memory_format)
    acc = ops.acc_dtype(dtype)
    scale, shift = torch.randn(c, dtype=acc), torch.randn(c, dtype=acc)
    return z, scale, shift


def slice_of_buffer(n, c, h, w, dtype, memory_format, extra=None, fill=float("nan")):
    """A NaN-poisoned concat buffer and the channel slice [extra, extra + c) of it. extra defaults to 2 channels
    (a slice starting off the 16-byte grid: one-channel runs) for c = 3, to 8 (on the grid) otherwise."""
    extra = (2 if c == 3 else 8) if extra is None else extra
    buf = torch.full((n, c + 2 * extra, h, w), fill, dtype=dtype).contiguous(memory_format=memory_format)
    return buf, buf.narrow(1, extra, c)


def backward_case(upscale, pool, memory_format, values=random, dtype=torch.float32, n=2, c=3, h=4, w=6):
    z, scale, shift = case(upscale, n=n, c=c, h=h, w=w, dtype=dtype, memory_format=memory_format, values=values)
    n, c, h, w = ops.logical_shape(z, upscale)
    _, grad = slice_of_buffer(n, c, h, w, dtype, memory_format, fill=0.0)
    grad.copy_(torch.randn(n, c, h, w, dtype=dtype))
    grad_pooled = None
    if pool:
        grad_pooled = torch.randn(n, c, h // 2, w // 2, dtype=dtype).contiguous(memory_format=memory_format)
    return grad, grad_pooled, z, scale, shift


@contextlib.contextmanager
def scratch_dir(tmp_path_factory, name):
    """A new folder under pytest's base temporary folder, removed when the block ends: the module- and
    session-scoped runs write hundreds of MB of checkpoints that pytest would otherwise keep for sessions."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port():
    """A free TCP port on 127.0.0.1, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_process_group(rank, world, port):
    """In a spawned rank: the default gloo process group of ``world`` ranks on 127.0.0.1:``port`` (one thread per
    rank, a 120 s collective timeout), destroyed on the way out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, args, nprocs, timeout_s):
    """Runs ``worker(rank, *args)`` in ``nprocs`` spawned processes; fails the test, and kills them, if they have
    not all finished within ``timeout_s`` seconds (a hang fails instead of stalling CI)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while not context.join(timeout=2):
            if datetime.datetime.now() > deadline:
                pytest.fail(f"the {nprocs} ranks did not finish within {timeout_s} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


TORCHRUN_TIMEOUT_S = 300
# fastunet.train's arguments for 2 steps of batch 4 at 32 x 32 and 4 validation images (one padded batch), exact
SMALL_TRAINING = ["--device", "cpu", "--size", "32", "--epochs", "1", "--steps-per-epoch", "2", "--val-samples", "3",
                  "--no-progress", "--log-every", "0", "--exact"]


def torchrun(processes, args, out, checkpoint="checkpoint.pt"):
    """``python -m fastunet.train`` on ``processes`` gloo processes (one thread each, torchrun's default); its
    history.json and fastunet's checkpoint, and what it printed."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m",
         "fastunet.train", *args, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "history.json").read_text()), torch.load(out / checkpoint), run.stdout

"""fastunet.parallel.spatial on 2 and 4 gloo ranks (spawned, bounded in time): one U-Net split by rows of the
image, one training step and an eval pass, against the seed U-Net on the whole image in one process: the
gathered output, the input gradient, every parameter gradient (the same on every rank) and the BN buffers within
the fast-mode error rule (flash-attention's 2x of the float32 reference's error against float64)."""

import copy
import os
import platform
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import (
    assert_within_twice_reference_error,
    free_port,
    gloo_process_group,
    pool_tie_free,
    relative_error,
    spawn_ranks,
    train_step,
    well_conditioned,
)

import fastunet
from fastunet import _ext, functional, parallel, spatial
from fastunet.conv import policy
from fastunet.reference import U_Net as Reference

TIMEOUT_S = 300


def _worker(rank, world, port, case_path, out_dir):
    case = torch.load(case_path)
    # the up blocks' sub-pixel convs: where the whole model's run them, or (case["subpixel"]) at every size
    threshold = 0 if case["subpixel"] else policy.value("subpixel_train_min_pixels")
    with gloo_process_group(rank, world, port), policy.override(subpixel_train_min_pixels=threshold):
        model = fastunet.U_Net(3, 2, exact=case["exact"])
        model.load_state_dict(case["state"])
        net = parallel.spatial(model, bucket_cap_mb=case["bucket_cap_mb"])
        x = parallel.split_rows(case["x"]).requires_grad_()
        assert net.state_dict().keys() == model.state_dict().keys()
        with mock.patch.object(functional, "phase_weights", wraps=functional.phase_weights) as phase_weights, \
                mock.patch.object(F, "max_pool2d", wraps=F.max_pool2d) as max_pool2d:
            out = net(x)
        # fast mode: the last decoder layer's BN + ReLU ran fused (exact mode: the seed's ATen layers)
        before_last_conv = [type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None]
        result_fused = "_FusedBNReLUBackward" in before_last_conv
        g = parallel.split_rows(case["g"])
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
            (out * g).sum().backward()
        loss = (out.detach().double() * g.double()).sum()  # the stripe's loss, summed in float64 as the test sums
        dist.all_reduce(loss)  # the whole image's loss: the sum of the stripes'
        result = {"out": parallel.gather_rows(out.detach()), "x_grad": parallel.gather_rows(x.grad), "loss": loss,
                  "grads": {n: p.grad for n, p in model.named_parameters()},
                  "buffers": {n: b.clone() for n, b in model.named_buffers()}, "fused": result_fused,
                  "subpixel_up_convs": phase_weights.call_count, "separate_pools": max_pool2d.call_count,
                  "buckets_reduced": [c.args[0].numel() for c in all_reduce.call_args_list if c.kwargs.get("async_op")]}
        # gather_rows backward: a loss every rank computes from the gathered whole sends each rank its rows' grads,
        # summed over the ranks
        stripe = torch.randn(1, 2, 16, 4, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        weights = torch.randn(1, 2, 16 * world, 4, generator=torch.Generator().manual_seed(99))
        (parallel.gather_rows(stripe) * weights).sum().backward()
        result["gather_grad"] = torch.equal(stripe.grad, world * weights[:, :, 16 * rank:16 * (rank + 1)])
        if world == 2:
            # whole_images: the whole batch in, the whole logits out on every rank, one loss computed from them on
            # every rank: the same step as the stripes' (averaging the ranks' gradients of it gives the stripes')
            whole = fastunet.U_Net(3, 2, exact=case["exact"])
            whole.load_state_dict(case["state"])
            out = parallel.spatial(whole, whole_images=True, bn_group=dist.group.WORLD)(case["x"])
            (out * case["g"]).sum().backward()
            result["whole_images_same_step"] = torch.equal(out.detach(), result["out"]) and all(
                torch.equal(p.grad, result["grads"][n]) for n, p in whole.named_parameters()) and all(
                torch.equal(b, result["buffers"][n]) for n, b in whole.named_buffers())
            # a second backward without zeroing the gradients adds its sum to theirs (only the new part is summed)
            before = {n: p.grad.clone() for n, p in whole.named_parameters()}
            out = parallel.spatial(whole, whole_images=True, bn_group=dist.group.WORLD)(case["x"])
            (out * case["g"]).sum().backward()
            result["accumulated_twice"] = all(torch.equal(p.grad, 2 * before[n]) for n, p in whole.named_parameters())
            # torch.autograd.grad would return the parameters' gradients unsummed: refused, the .grads left as they were
            try:
                torch.autograd.grad(parallel.spatial(whole)(parallel.split_rows(case["x"])).sum(),
                                    list(whole.parameters()))
                result["autograd_grad_refused"] = False
            except RuntimeError as error:
                result["autograd_grad_refused"] = "autograd.grad" in str(error) and all(
                    torch.equal(p.grad, 2 * before[n]) for n, p in whole.named_parameters())
            # a second derivative through the stripes is refused, not silently wrong (the exchanges are not recorded)
            stripe = parallel.split_rows(case["x"]).requires_grad_()
            first, = torch.autograd.grad(parallel.spatial(whole)(stripe).sum(), stripe, create_graph=True)
            try:
                first.sum().backward()
                result["double_backward_refused"] = False
            except RuntimeError as error:
                result["double_backward_refused"] = "once_differentiable" in str(error)
        net.eval()
        with torch.no_grad():
            result["eval"] = parallel.gather_rows(net(parallel.split_rows(case["x"])))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_spatial(tmp_path, world, exact, state, x, g, subpixel=False, bucket_cap_mb=25):
    """One training step and one eval pass on ``world`` spawned gloo ranks (``subpixel``: fast mode's up blocks run
    the sub-pixel conv at every size; gradients summed in buckets of ``bucket_cap_mb``); rank 0's results, after
    checking that every rank holds the same gathered tensors, parameter gradients and buffers, and that each
    gradient went into exactly one all-reduced bucket."""
    case_path = str(tmp_path / "case.pt")
    torch.save(dict(state=state, exact=exact, x=x, g=g, subpixel=subpixel, bucket_cap_mb=bucket_cap_mb), case_path)
    spawn_ranks(_worker, (world, free_port(), case_path, str(tmp_path)), world, TIMEOUT_S)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["gather_grad"] for r in results)
    assert all(r["fused"] == (not exact) for r in results)
    assert all(r["subpixel_up_convs"] == (4 if subpixel else 0) for r in results)
    assert all(r["separate_pools"] == (4 if exact else 0) for r in results)  # fast mode: in the BN + ReLU pass
    assert all(r.get("whole_images_same_step", world != 2) for r in results)
    assert all(r.get("double_backward_refused", world != 2) for r in results)
    assert all(r.get("accumulated_twice", world != 2) and r.get("autograd_grad_refused", world != 2) for r in results)
    # float32 buckets of at most bucket_cap_mb (a parameter larger than that alone), every parameter's gradient in
    # exactly one: the buckets' elements add up to the parameters'
    params = {n: v for n, v in state.items() if "running" not in n and "num_batches" not in n}
    sizes = sorted(v.numel() for v in params.values())
    for r in results:
        assert sum(r["buckets_reduced"]) == sum(sizes)
        assert all(n * 4 <= bucket_cap_mb * 1e6 or n in sizes for n in r["buckets_reduced"])
        assert len(r["buckets_reduced"]) > 1
    for other in results[1:]:
        for key in ("out", "x_grad", "eval", "loss"):
            assert torch.equal(other[key], results[0][key]), key
        for group in ("grads", "buffers"):
            for name, value in results[0][group].items():
                assert torch.equal(other[group][name], value), f"{group} {name} differs between ranks"
    return results[0]


@pytest.mark.parametrize("world, n, h, exact, zero_stripe, subpixel, bucket_cap_mb", [
    (2, 1, 32, True, False, False, 25),  # batch 1, stripes of exactly 16 rows
    (2, 2, 64, False, True, True, 25),  # 32-row stripes, rank 1's all zeros, the sub-pixel up-convs
    (4, 1, 64, False, False, False, 2),  # 16-row stripes on 4 ranks, 2 MB gradient buckets
])
def test_spatial_step_matches_the_whole_image(tmp_path, world, n, h, exact, zero_stripe, subpixel, bucket_cap_mb):
    torch.manual_seed(world * 100 + h + n)
    ref = Reference(3, 2)
    well_conditioned(ref)
    ref64 = copy.deepcopy(ref).double()

    def draw():
        x = torch.randn(n, 3, h, 32)
        if zero_stripe:
            x[:, :, h // world:2 * h // world] = 0
        return x

    # An all-zero stripe makes constant activations, whose max-pool windows tie: float32 (the reference's and the
    # stripes', whose convs give the whole image's bits) routes their gradients alike, float64 differently, and the
    # rule holds; elsewhere a near-tie would flip with the draw, so it is drawn away.
    x = draw() if zero_stripe else pool_tie_free(ref64, draw)
    g = torch.randn(n, 2, h, 32)
    state = copy.deepcopy(ref.state_dict())
    got = run_spatial(tmp_path, world, exact, state, x, g, subpixel, bucket_cap_mb)
    want32 = train_step(ref, x, g)
    want64 = train_step(ref64, x.double(), g.double())
    result = (got["out"], got["x_grad"], got["grads"], got["buffers"])
    assert_within_twice_reference_error(result, want32, want64)
    # the ranks' losses add up to the whole image's, within what the output's error allows (Cauchy-Schwarz: a
    # scalar's own error ratio is too noisy for the 2x rule)
    loss64, out_error = (want64[0] * g.double()).sum(), (want32[0].double() - want64[0]).norm()
    assert abs(got["loss"] - loss64) <= (2 * out_error + 1e-7 * want64[0].norm()) * g.double().norm()
    ref.eval(), ref64.eval()
    with torch.no_grad():
        assert relative_error(got["eval"], ref64(x.double())) <= 2 * relative_error(ref(x), ref64(x.double())) + 1e-7


def test_split_rows_refuses_stripes_that_are_not_multiples_of_16():
    with mock.patch("fastunet.spatial._rank_world", return_value=(0, 2)):
        with pytest.raises(ValueError, match="H must be a multiple of 32"):
            parallel.split_rows(torch.randn(1, 3, 48, 32))
        assert torch.equal(parallel.split_rows(x := torch.randn(1, 3, 64, 32)), x[:, :, :32])


@pytest.mark.parametrize("change, message", [
    (lambda m: m.Conv2.conv[0].register_forward_hook(lambda *a: None), "Conv2.conv.0 has hooks"),
    (lambda m: m.Up3.up.__setitem__(3, torch.nn.LeakyReLU()), "Up3.up.3 is a LeakyReLU"),
    (lambda m: setattr(m, "Maxpool", torch.nn.MaxPool2d(3, 2, 1)), "Maxpool is not the seed's 2x2 max-pool"),
])
def test_spatial_refuses_what_it_cannot_honour_before_any_exchange(change, message):
    # no process group here: the refusal comes before the first halo exchange
    model = fastunet.U_Net(3, 1)
    change(model)
    with pytest.raises(ValueError, match=message):
        parallel.spatial(model)(torch.randn(1, 3, 32, 32))


class _DoubledConv(torch.nn.Conv2d):
    """A conv of the user's own: twice the seed's conv, in its own forward."""

    def forward(self, x):
        return 2 * super().forward(x)


class _ClampedReLU(torch.nn.ReLU):
    """A ReLU of the user's own: clamped at 1."""

    def forward(self, x):
        return super().forward(x).clamp_max(1)


class _Halved(torch.nn.Module):
    """A parametrization: the weight the layer reads is half the one it stores."""

    def forward(self, weight):
        return weight / 2


def _swap_conv(model):
    old = model.Conv2.conv[3]
    new = _DoubledConv(old.in_channels, old.out_channels, 3, padding=1)
    new.load_state_dict(old.state_dict())
    model.Conv2.conv[3] = new


@pytest.mark.parametrize("change, dtype, refusal", [
    (None, torch.float32, None),  # every block fused in both
    (lambda m: torch.nn.utils.parametrize.register_parametrization(m.Conv3.conv[0], "weight", _Halved()),
     torch.float32, None),  # fused in both, the parametrization honoured
    (lambda m: setattr(m, "exact", True), torch.float32, None),  # exact mode: the stripes run the seed's layers
    (None, torch.float64, None),  # float64: unfused in both, with the whole model's warning
    (lambda m: m.Up3.up[1].register_forward_hook(lambda *a: None), torch.float32, "Up3.up.1 has hooks"),
    (_swap_conv, torch.float32, "Conv2.conv.3 is a _DoubledConv, which runs only whole"),
    (lambda m: m.Up_conv4.conv.__setitem__(5, _ClampedReLU()), torch.float32, "Up_conv4.conv.5 is a _ClampedReLU"),
])
def test_a_spatial_model_fuses_and_falls_back_where_the_whole_model_does(change, dtype, refusal, fresh_warnings):
    # One rank (its halos the image's zero rows), in eval, so no process group is needed. Where the whole model
    # runs a block fused, the stripes run it fused; where the whole model falls back for a layer the stripes can
    # run themselves, they fall back too, with the same warning; a layer they cannot run as the whole model runs
    # it (a hook, a forward of its own) is an error naming it, not skipped.
    model = fastunet.U_Net(3, 2).to(dtype)
    if change is not None:
        change(model)
    model.eval()
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    with mock.patch.object(functional, "double_conv_bn_relu", wraps=functional.double_conv_bn_relu) as double, \
            mock.patch.object(functional, "upsample_conv_cat", wraps=functional.upsample_conv_cat) as up, \
            torch.no_grad():
        want = model(x)
    fused_ops = 2 * double.call_count + up.call_count  # a fused BN + ReLU per conv of a fused block
    whole_warnings = fresh_warnings()
    _ext._warned.clear()
    net = parallel.spatial(model)
    with mock.patch.object(spatial, "_rank_world", return_value=(0, 1)), \
            mock.patch.object(spatial._FusedBNReLU, "apply", wraps=spatial._FusedBNReLU.apply) as fused, \
            torch.no_grad():
        if refusal is not None:
            assert fused_ops < 22  # the whole model ran the changed block's own modules
            with pytest.raises(ValueError, match=refusal):
                net(x)
            return
        got = net(x)
    if model.exact:  # the stripes' fused ops are fast mode's: exact mode runs the seed's layers on them
        assert fused.call_count == 0
    else:
        assert fused.call_count == fused_ops == (22 if dtype == torch.float32 else 0)
    assert fresh_warnings()[len(whole_warnings):] == whole_warnings
    assert relative_error(got, want) <= 1e-5


_GIVEN_BACK = """
import sys, torch
from fastunet import parallel
def anon_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024
if sys.argv[1] == "set":
    assert parallel.malloc_mmap_threshold(4 << 20)
first = torch.randn(4 << 20); del first  # a 16 MiB block freed: glibc's own threshold rises to its size
stripe = torch.randn(2 << 20); held = anon_mib(); del stripe  # an 8 MiB block, as a quarter image's tensor
print(held - anon_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_mmap_threshold_gives_freed_blocks_back():
    """As glibc comes, a freed block under the largest freed before stays in the heap (the stripes of a split
    image); with malloc_mmap_threshold its pages go back to the system when it is freed. Each in a fresh process:
    the setting is process-wide."""
    given_back = {}
    for mode in ("default", "set"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's malloc as it comes
        run = subprocess.run([sys.executable, "-c", _GIVEN_BACK, mode], capture_output=True, text=True, timeout=120,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        given_back[mode] = float(run.stdout.split()[-1])
    assert given_back["set"] >= 7.5 and given_back["default"] < 1.0, given_back
    for bad in (0, 33 << 20, 1.5, True):
        with pytest.raises(ValueError, match="1 byte to 32 MiB"):
            parallel.malloc_mmap_threshold(bad)

"""Smoke test of an installed fastunet (tools/build_wheel.sh runs it against a freshly installed wheel).

Checks: fastunet imports from where it was installed; its compiled ops load (no ABI/CUDA mismatch) and are
registered for the CPU, and for CUDA when the build has CUDA kernels; the version tag names the running torch
and CUDA; the Triton kernels package is present; one training step (forward + backward) and one inference
on every device present: exact mode bit-identical to the pure-PyTorch U-Net, fast mode close to it.

  python tools/smoke_test.py [--expect-location DIR] [--expect-cuda]
"""

import argparse
import copy
import os
import sys

import torch


def fail(message):
    sys.exit(f"smoke test FAILED: {message}")


def train_step(model, x, target):
    out = model(x)
    torch.nn.functional.binary_cross_entropy_with_logits(out.float(), target).backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def check_device(device):
    import fastunet
    from fastunet.reference import U_Net as Reference
    from fastunet.testing import relative_error

    torch.manual_seed(0)
    reference = Reference(3, 1).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    target = (torch.rand(2, 1, 32, 32, device=device) > 0.5).float()
    trained_reference = copy.deepcopy(reference)
    ref_out, ref_grads = train_step(trained_reference, x, target)
    with torch.no_grad():
        ref_infer = trained_reference.eval()(x)  # with the running statistics of the training step
    for exact in (True, False):
        model = fastunet.U_Net(3, 1, exact=exact).to(device)
        model.load_state_dict(reference.state_dict())
        out, grads = train_step(model, x, target)
        if exact and not (torch.equal(out, ref_out) and all(torch.equal(grads[k], ref_grads[k]) for k in grads)):
            fail(f"exact mode on {device} is not bit-identical to the reference")
        if not exact:
            err = relative_error(out, ref_out)
            if not err < 1e-3 or not all(torch.isfinite(g).all() for g in grads.values()):
                fail(f"fast mode on {device}: output relative error {err:.2e} (or a non-finite gradient)")
        model.eval()
        with torch.no_grad():
            infer = model(x)
        infer_err = relative_error(infer, ref_infer)
        if (exact and not torch.equal(infer, ref_infer)) or not infer_err < 1e-3:
            fail(f"inference on {device} (exact={exact}): relative error {infer_err:.2e} against the reference")
    print(f"  {device}: one training step and one inference, exact bit-identical, fast close: ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expect-location", help="fastunet must be imported from under this folder")
    parser.add_argument("--expect-cuda", action="store_true", help="the build must hold the CUDA kernels")
    args = parser.parse_args()

    import fastunet
    from fastunet import _ext

    where = os.path.dirname(os.path.abspath(fastunet.__file__))
    if args.expect_location and not where.startswith(os.path.abspath(args.expect_location)):
        fail(f"fastunet was imported from {where}, not from {args.expect_location}")
    fastunet.info()
    if not _ext.available():
        fail(f"the compiled ops did not load: {_ext.load_error}")
    if args.expect_cuda and not _ext.has_cuda_kernels():
        fail("the build holds no CUDA kernels")
    version = _ext.installed_version() or ""
    cpu_tag = "+cputorch" + _ext._minor(torch.__version__)
    tag = _ext.wheel_tag_for_running_torch() if _ext.has_cuda_kernels() else cpu_tag
    if not version.endswith(tag):
        fail(f"installed version {version!r} does not carry the tag {tag!r} of the running torch")
    # The compiled kernels the library registers: csrc/ops.cpp (CPU) and csrc/ops_cuda.cu (CUDA).
    sources = ["ops.cpp"] + (["ops_cuda.cu"] if _ext.has_cuda_kernels() else [])
    for op in fastunet.ops.FUSED_OPS:
        registrations = torch._C._dispatch_dump(f"fastunet::{op}")
        for source in sources:
            if source not in registrations:
                fail(f"fastunet::{op} has no kernel from {source}:\n{registrations}")
    print(f"  ops {', '.join(fastunet.ops.FUSED_OPS)} have their kernels from {' and '.join(sources)}: ok")
    import fastunet.kernels  # noqa: F401  (the Triton kernels ship in the wheel)

    torch.backends.cudnn.deterministic = True  # bit equality of two runs needs cuDNN's deterministic algorithms
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        check_device(device)
    print(f"smoke test passed: fastunet {version} from {where}")


if __name__ == "__main__":
    main()

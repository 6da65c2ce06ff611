"""The dispatcher as the one door of the fused ops: one registry (fastunet.ops.FUSED_OPS), each op registered
under its one schema with its kernels by dispatch key, the choices made once, at import."""

import os
import subprocess
import sys

import pytest
import torch

from fastunet import _ext, kernels, ops
from fastunet.conv import winograd


def kernel_sources(op):
    """dispatch key -> where its active kernel was registered (a file name), from the dispatcher's own dump."""
    sources = {}
    for line in torch._C._dispatch_dump(f"fastunet::{op}").splitlines():
        key, sep, rest = line.partition(": registered at ")
        if sep and "(inactive)" not in key:
            sources[key] = os.path.basename(rest.split(":")[0])
    return sources


def test_the_namespace_holds_the_registry_s_ops_and_the_triton_conv():
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastunet::")}
    assert names == set(ops.FUSED_OPS) | set(winograd.WINOGRAD_OPS) | {"conv3x3_bn_relu_stats"}
    assert not any(n.startswith("fastunet_triton::") for n in torch._C._dispatch_get_all_op_names())


@pytest.mark.parametrize("op", list(ops.FUSED_OPS))
def test_each_op_is_registered_under_its_one_schema(op):
    """The compiled library declares the schemas for libtorch users; they are the registry's, word for word."""
    assert str(getattr(torch.ops.fastunet, op).default._schema) == f"fastunet::{ops.FUSED_OPS[op].schema}"
    sources = kernel_sources(op)
    assert sources.get("CPU") == ("ops.cpp" if _ext.available() else None)
    assert sources["Meta"] == sources["CompositeExplicitAutograd[alias]"] == "ops.py"  # the fake, the reference
    assert sources["CUDA"] == ("ops_cuda.cu" if ops._cuda_kernels == "compiled" else "ops.py")


@pytest.mark.parametrize("op", list(winograd.WINOGRAD_OPS))
def test_each_winograd_op_is_registered_under_its_one_schema(op):
    """The CPU-only Winograd ops: compiled in csrc/winograd.cpp, their references serving every other device."""
    assert str(getattr(torch.ops.fastunet, op).default._schema) == f"fastunet::{winograd.WINOGRAD_OPS[op][0]}"
    sources = kernel_sources(op)
    assert sources.get("CPU") == ("winograd.cpp" if _ext.available() else None)
    assert sources["Meta"] == sources["CompositeExplicitAutograd[alias]"] == "winograd.py"
    assert "CUDA" not in sources


def test_mutations_are_declared_where_kernels_write():
    schema = torch.ops.fastunet.bn_relu_pool.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == ["out",
                                                                                                      "pooled"]
    for op in set(ops.FUSED_OPS) - {"bn_relu_pool"}:
        assert not getattr(torch.ops.fastunet, op).default._schema.is_mutable, op


@pytest.mark.skipif(not kernels.available(), reason="needs triton")
@pytest.mark.parametrize("op", list(ops.FUSED_OPS))
def test_each_op_has_its_triton_kernel_by_its_name(op):
    launcher = getattr(kernels, op)
    assert launcher.__name__ == op and launcher.__module__.endswith(ops.FUSED_OPS[op].triton_module)


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="needs a build with the CUDA kernels")
def test_select_cuda_kernels_registers_the_choice():
    try:
        assert ops.select_cuda_kernels("cuda") == "compiled" == ops.backend_for("cuda:0")
        assert kernel_sources("bn_stats")["CUDA"] == "ops_cuda.cu"
        assert ops.select_cuda_kernels("reference") == "reference" == ops.backend_for("cuda:0")
        assert kernel_sources("bn_stats")["CUDA"] == "ops.py"
        with pytest.raises(ValueError, match="one of triton, compiled, reference"):
            ops.select_cuda_kernels("cudnn")
    finally:
        ops.select_cuda_kernels("triton")
    assert kernel_sources("bn_stats")["CUDA"] == "ops.py" and ops._cuda_kernels == "triton"


def test_environment_is_read_once_at_import(monkeypatch):
    before = (ops.backend_for("cpu"), ops._cuda_kernels, ops.conv3x3_mode())
    monkeypatch.setenv("FASTUNET_BACKEND", "reference")
    monkeypatch.setenv("FASTUNET_CUDA_BACKEND", "cuda")
    monkeypatch.setenv("FASTUNET_CONV", "triton")
    assert (ops.backend_for("cpu"), ops._cuda_kernels, ops.conv3x3_mode()) == before
    with pytest.raises(ValueError, match="one of aten, triton, auto"):
        ops.set_conv3x3_mode("winograd")


def test_fastunet_backend_reference_registers_the_references_everywhere():
    script = (
        "import torch, fastunet, os\n"
        "from fastunet import ops\n"
        "dump = torch._C._dispatch_dump('fastunet::bn_stats')\n"
        "active = [l for l in dump.splitlines() if l.startswith(('CPU:', 'CUDA:'))]\n"
        "assert len(active) == 2 and all('ops.py' in l for l in active), dump\n"
        "assert ops.backend_for('cpu') == ops.backend_for('cuda:0') == 'reference'\n"
        "z = torch.randn(2, 3, 5, 4)\n"
        "assert all(torch.equal(a, b) for a, b in zip(ops.bn_stats(z, 1), ops.bn_stats_ref(z, 1)))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "FASTUNET_BACKEND": "reference"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_device_without_kernels_runs_the_references():
    z = torch.randn(2, 3, 5, 4, device="meta")
    assert ops.bn_stats(z, 1)[0].shape == (3,)  # the fake
    assert ops.backend_for("mps") == "reference"

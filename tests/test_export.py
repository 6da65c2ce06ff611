"""Export of the eval model: torch.export with dynamic batch and H/W, ONNX run by ONNX Runtime, torch.jit.trace.

While exporting, fastunet records the seed's pure-PyTorch graph (fastunet.model.exporting), so the exported
program holds only standard operators and runs wherever the reference U-Net's would.
"""

import warnings

import pytest
import torch

import fastunet
from fastunet.reference import U_Net as Reference


def _eval_model(exact):
    ref = Reference(3, 2)
    with torch.no_grad():  # non-trivial running stats, as after training
        for bn in (m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features))
    model = fastunet.U_Net(3, 2, exact=exact)
    model.load_state_dict(ref.state_dict())
    return model.eval()


def _dynamic_shapes():
    """Any batch, H and W any multiple of 16 from 32 (a 1x1 bottleneck is a size-1 dim that export specializes)."""
    dim = torch.export.Dim
    return {"x": {0: dim("batch", min=1, max=64), 2: 16 * dim("h16", min=2, max=256),
                  3: 16 * dim("w16", min=2, max=256)}}


@pytest.mark.parametrize("exact", [False, True])
def test_torch_export_with_dynamic_batch_and_size(exact):
    model = _eval_model(exact)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=_dynamic_shapes())
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and all(t.startswith("aten.") or t.startswith("<built-in") for t in targets), targets
    exported = program.module()
    for shape in [(3, 3, 48, 64), (1, 3, 32, 96)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match=r"x.size\(\)\[2\] % 16 == 0"):  # H = 40: outside the exported shapes
        exported(torch.randn(2, 3, 40, 32))


def test_onnx_export_runs_in_onnx_runtime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _eval_model(exact=False)
    path = tmp_path / "unet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_shapes=_dynamic_shapes(), dynamo=True)
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 32, 32), (3, 3, 48, 64)]:
        x = torch.randn(shape)
        (y,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-4)


def test_jit_trace_for_libtorch():
    model = _eval_model(exact=False)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in favour of torch.export, still used
        traced = torch.jit.trace(model, (x,))
    assert not [n for n in traced.inlined_graph.nodes() if n.kind().startswith("fastunet")]
    assert {n.kind() for n in traced.inlined_graph.nodes()} >= {"aten::_convolution", "aten::max_pool2d"}
    x2 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x2), model(x2), rtol=1e-4, atol=1e-5)

"""``python -m fastunet.selftest`` on this machine: it passes here, and it fails, naming the rows, when an op or the
model is broken."""

import pytest
import torch

from fastunet import ops, selftest


def report(capsys):
    """The printed rows, as {(op or model, case): "pass" or "FAIL"}."""
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        for verdict in (" pass ", " FAIL "):
            if verdict in line:
                what, case = line.split(verdict)[0][:26].strip(), line.split(verdict)[0][26:].strip()
                rows[(what, case)] = verdict.strip()
    return rows


def test_the_selftest_passes_here(capsys):
    assert selftest.main([]) == 0
    rows = report(capsys)
    ops_checked = {what for what, _ in rows}
    assert set(ops.FUSED_OPS) < ops_checked
    assert {"U_Net exact train", "U_Net exact eval", "U_Net fast train", "U_Net fast eval"} < ops_checked
    cases = {case for what, case in rows if what == "bn_relu_pool"}
    assert len(cases) == len(selftest.DTYPES) * len(selftest.LAYOUTS) * len(selftest.GEOMETRIES)
    assert set(rows.values()) == {"pass"}


def off_by(op, relative):
    """``op`` with its (first) result scaled by 1 + relative."""
    def broken(*args):
        result = op(*args)
        if isinstance(result, tuple):
            return (result[0] * (1 + relative), *result[1:])
        return result * (1 + relative)
    return broken


def leaves_one_unwritten(op):
    """bn_relu_pool that leaves the last element of ``out`` as it was."""
    def broken(z, scale, shift, upscale, out, pooled=None):
        kept = out[-1, -1, -1, -1].clone()
        op(z, scale, shift, upscale, out, pooled)
        out[-1, -1, -1, -1] = kept
    return broken


@pytest.mark.parametrize("name, breakage", [
    ("bn_relu_backward_apply", lambda op: off_by(op, 1e-3)),
    ("bn_stats", lambda op: off_by(op, 1e-4)),
    ("bn_relu_pool", leaves_one_unwritten),
])
def test_the_selftest_fails_on_a_broken_op(name, breakage, monkeypatch, capsys):
    monkeypatch.setattr(ops, name, breakage(getattr(ops, name)))
    assert selftest.main(["--ops-only"]) == 1
    rows = report(capsys)
    failed = {what for (what, _), verdict in rows.items() if verdict == "FAIL"}
    assert failed == {name}
    assert sum(verdict == "FAIL" for verdict in rows.values()) >= len(selftest.DTYPES) * len(selftest.LAYOUTS)


def test_the_selftest_fails_on_a_model_off_the_seed(monkeypatch, capsys):
    """A U-Net whose output is off by 1e-3 of its spread fails both modes' rows, in training and eval."""

    class OffUNet(selftest.U_Net):
        def forward(self, x):
            out = super().forward(x)
            return out + 1e-3 * out.detach().std()

    monkeypatch.setattr(selftest, "U_Net", OffUNet)
    monkeypatch.setattr(selftest, "all_op_rows", lambda device: [])
    assert selftest.main([]) == 1
    rows = report(capsys)
    assert rows == {(what, case): "FAIL" for what, case in rows} and len(rows) == 4
    assert torch.backends.cudnn.deterministic is False  # the exact rows' cuDNN settings are put back

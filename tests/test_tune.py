"""fastunet.tune: what it times (every candidate that keeps the error rule, the seed's ATen path always among them),
the plan it stores per machine, and that the policy follows the stored plan, in this process and in a new one."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastunet
from fastunet.conv import plan as stored_plan
from fastunet.conv import policy

SEED_PATHS = {"train_conv": "aten", "inference_conv": "unfolded", "up_conv": "upsampled", "second_conv": "aten"}


@pytest.fixture
def plan_dir(tmp_path, monkeypatch):
    """An empty plan folder of this test's own."""
    monkeypatch.setenv("FASTUNET_PLAN_DIR", str(tmp_path))
    return tmp_path


def _explained_rules(model, x, train):
    return {line.layer: line.rule for line in fastunet.explain(model, x, train=train)}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_tune_times_every_candidate_and_the_policy_follows_the_plan(plan_dir, conv_policy, train):
    """Every timed decision has a median per candidate, the seed's path among them, and picks the fastest; the plan
    file holds them; explain then says "tuned" for those layers and the model runs the tuned algorithms: its output
    is the one under policy.use_plan of the same plan, bit for bit."""
    conv_policy(winograd_train=True, gemm_train_max_pixels=policy.GEMM_TRAIN_MAX_PIXELS_AVX2)
    model = fastunet.U_Net().train(train)
    x = torch.randn(2, 3, 32, 32)
    assert "tuned" not in " ".join(_explained_rules(model, x, train).values())
    tuning = fastunet.tune(model, x, train=train, reps=1)
    assert len(tuning) >= 3 and tuning.file == stored_plan.path() and os.path.exists(tuning.file)
    for timed in tuning:
        assert SEED_PATHS[timed.decision] in timed.ms and len(timed.ms) >= 2
        assert timed.algorithm == min(timed.ms, key=timed.ms.get)
        assert all(ms > 0 for ms in timed.ms.values())
    stored = json.load(open(tuning.file))
    assert stored["machine"] == stored_plan.machine() and len(stored["entries"]) == len(tuning)
    assert stored_plan.load(tuning.file) == tuning.plan()
    rules = _explained_rules(model, x, train)
    assert sum("tuned on this machine" in rule for rule in rules.values()) >= len(tuning)
    model.eval()
    with torch.no_grad():
        tuned = model(x)
        with policy.use_plan(tuning.plan()):
            planned = model(x)
    assert torch.equal(tuned, planned)


def test_a_stored_plan_changes_what_runs_in_a_new_process(plan_dir):
    """A plan entry that differs from the rules' choice (found here) is what a new process runs and explains."""
    model, x = fastunet.U_Net().eval(), torch.randn(1, 3, 32, 32)
    with policy.recording() as decisions:
        lines = fastunet.explain(model, x)
    decision, layer, candidates = next(d for d in decisions if d[0] == "inference_conv" and len(d[2]) > 1)
    default = policy.inference_conv(layer, kept=True).algorithm
    other = next(name for name in candidates if name != default)
    stored_plan.save({(decision, layer.key()): other}, {})
    code = ("import torch, fastunet; m = fastunet.U_Net().eval(); "
            "print('\\n'.join(l.rule for l in fastunet.explain(m, torch.randn(1, 3, 32, 32))))")
    explained = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "tuned on this machine" in explained and "tuned" not in " ".join(line.rule for line in lines)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FASTUNET_PLAN": "off"}).stdout
    assert "tuned" not in off


def test_a_plan_is_kept_per_machine_threads_included(plan_dir):
    """Another thread count is another machine: its plan file differs, and this one's entries are not read there."""
    model, x = fastunet.U_Net().eval(), torch.randn(1, 3, 32, 32)
    file = fastunet.tune(model, x, reps=1).file
    assert stored_plan.current()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert stored_plan.path() != file and stored_plan.current() == {}
        assert "tuned" not in " ".join(_explained_rules(model, x, False).values())
    finally:
        torch.set_num_threads(threads)


def test_tuning_leaves_out_what_breaks_the_error_rule(plan_dir, conv_policy):
    """Where the policy turns Winograd and the GEMMs off in training for accuracy (AVX-512), tuning does not time
    them, and a stored plan entry naming them is passed over."""
    conv_policy(winograd_train=False, gemm_train_max_pixels=0)
    model, x = fastunet.U_Net().train(), torch.randn(2, 3, 32, 32)
    tuning = fastunet.tune(model, x, train=True, reps=1, save=False)
    assert all(set(t.ms) <= {"aten", "shifted_gemm", "subpixel", "upsampled"} for t in tuning)
    with policy.recording() as decisions:
        fastunet.explain(model, x, train=True)
    decision, layer, _ = next(d for d in decisions if d[0] == "train_conv" and d[1].kernel == 3 and d[1].cin >= 64)
    stored_plan.save({(decision, layer.key()): "gemm"}, {})
    assert policy.train_conv(layer).algorithm == "aten"
    with policy.override(gemm_train_max_pixels=policy.GEMM_TRAIN_MAX_PIXELS_AVX2):
        assert policy.train_conv(layer) == policy.Choice("gemm", "tuned on this machine")


def test_tune_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reps"):
        fastunet.tune(fastunet.U_Net(), torch.randn(1, 3, 32, 32), reps=0)
    with pytest.raises(TypeError, match="fastunet.explain takes"):
        fastunet.tune(torch.nn.Conv2d(3, 3, 3), torch.randn(1, 3, 32, 32))


def test_train_tune_stores_a_plan_before_training(plan_dir, tmp_path):
    """``python -m fastunet.train --tune`` tunes the model for its batch, then trains; with --spatial it is refused."""
    from fastunet.train import main

    result = main(["--device", "cpu", "--size", "32", "--batch", "2", "--epochs", "1", "--steps-per-epoch", "1",
                   "--val-samples", "2", "--no-progress", "--tune", "--out", str(tmp_path / "out")])
    assert len(result["models"]["fastunet"]["losses"]) == 1
    assert stored_plan.current() and os.path.exists(stored_plan.path())
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--spatial", "2", "--tune", "--out", str(tmp_path / "out")])


def test_bench_tune_stores_a_plan_the_fast_rows_follow(plan_dir, tmp_path, monkeypatch, capsys):
    """``python -m fastunet.bench --tune`` prints the tunings, records the plan file, and the fast model's explain
    then says tuned."""
    from fastunet import bench

    monkeypatch.setattr(bench.cli, "default_plan", lambda device, quick: (2, 16, 1, 1))
    assert bench.main(["--device", "cpu", "--batch", "1", "--size", "32", "--configs", "fastunet_fast", "--no-memory",
                       "--tune", "--explain", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["tuned_plan"] == stored_plan.path() and stored_plan.current()
    out = capsys.readouterr().out
    assert "plan: " + stored_plan.path() in out and "tuned on this machine" in out

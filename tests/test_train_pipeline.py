"""``python -m fastunet.train --pipeline N`` under torchrun on the CPU (gloo): exact mode's pipelined training is
single-process training bit for bit (one micro-batch), a 2 x 2 mesh with synchronized BN is DDP over 2 processes
(``--compare``, with the reference) bit for bit, the interleaved schedule trains a channels_last model, and the
checkpoints load strictly into the seed U-Net."""

import json
import os

import pytest
import torch
from helpers import SMALL_TRAINING as SMALL
from helpers import torchrun

from fastunet.reference import U_Net as Reference
from fastunet.train import main


def assert_same_training(got, want):
    """The same per-step losses, validation metrics, weights, BN buffers and Adam moments, bit for bit."""
    (history, checkpoint, _), (want_history, want_checkpoint, _) = got, want
    got_model, want_model = history["models"]["fastunet"], want_history["models"]["fastunet"]
    assert got_model["losses"] == want_model["losses"] and len(want_model["losses"]) == 2
    assert [(e["dice"], e["iou"]) for e in got_model["epochs"]] == [(e["dice"], e["iou"]) for e in want_model["epochs"]]
    assert checkpoint["model"].keys() == want_checkpoint["model"].keys()
    for key, value in want_checkpoint["model"].items():
        assert torch.equal(checkpoint["model"][key], value), key
    Reference(3, 1).load_state_dict(checkpoint["model"], strict=True)
    # the single-process optimizer state is indexed in the model's parameter order, the pipelined one by name
    names = [n for n, _ in Reference(3, 1).named_parameters()]
    assert sorted(checkpoint["optimizer"]["state"]) == sorted(names)
    for index, name in enumerate(names):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(checkpoint["optimizer"]["state"][name][moment],
                               want_checkpoint["optimizer"]["state"][index][moment]), (name, moment)


def test_one_micro_batch_pipeline_is_single_process_training_bit_for_bit(tmp_path, monkeypatch):
    got = torchrun(2, [*SMALL, "--batch", "4", "--pipeline", "2", "--pp-schedule", "gpipe", "--microbatches", "1"],
                   tmp_path / "pp")
    assert got[0]["config"]["pipeline"] == 2 and got[0]["config"]["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs (a conv's summation order may follow the threads)
    try:
        main([*SMALL, "--batch", "4", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    want = (json.loads((tmp_path / "one" / "history.json").read_text()),
            torch.load(tmp_path / "one" / "checkpoint.pt"), None)
    assert_same_training(got, want)


def test_two_by_two_mesh_with_sync_bn_is_ddp_bit_for_bit(tmp_path, ddp_sync_bn_training):
    # 2 pipelines x 2 replicas: each stage's DDP averages over its replicas and its BatchNorms synchronize over
    # them, as DDP over 2 processes with --sync-bn does for the whole model (run with --compare: the reference
    # trains there too, under DDP with synchronized BN on gloo).
    want, ddp_out = ddp_sync_bn_training
    got = torchrun(4, [*SMALL, "--batch", "2", "--sync-bn", "--pipeline", "2", "--pp-schedule", "gpipe",
                       "--microbatches", "1"], tmp_path / "mesh")
    assert got[0]["config"]["world_size"] == 4 and want[0]["config"]["world_size"] == 2
    assert got[2].count("model      final loss") == want[2].count("model      final loss") == 1  # rank 0 alone
    assert_same_training(got, want)
    assert len(want[0]["models"]["reference"]["losses"]) == 2
    assert sorted(os.listdir(ddp_out)) == ["checkpoint_fastunet.pt", "checkpoint_reference.pt", "history.json",
                                           "loss.png"]
    Reference(3, 1).load_state_dict(torch.load(ddp_out / "checkpoint_reference.pt")["model"], strict=True)


def test_interleaved_schedule_trains_a_channels_last_model_and_checkpoints(tmp_path):
    # (gpipe: the tests above) two stages per process, NHWC-ordered tensors between stages
    history, checkpoint, _ = torchrun(2, [*SMALL, "--batch", "4", "--pipeline", "2", "--pp-schedule", "interleaved",
                                          "--channels-last"], tmp_path)
    assert history["config"]["microbatches"] == 4  # by default one per stage
    losses = history["models"]["fastunet"]["losses"]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses) and losses[0] != losses[1]
    Reference(3, 1).load_state_dict(checkpoint["model"], strict=True)
    assert 0 <= history["models"]["fastunet"]["epochs"][0]["dice"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--microbatches", "2"], "--microbatches applies to --pipeline only"),
    (["--pipeline", "2", "--compare"], "--pipeline trains fastunet.U_Net alone"),
    (["--pipeline", "2", "--amp", "fp16"], "--pipeline trains fastunet.U_Net alone"),
    (["--pipeline", "0"], "--pipeline must be at least 1"),
])
def test_pipeline_options_are_checked(capsys, args, message):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", *args])
    assert message in capsys.readouterr().err


def test_pipeline_batch_and_process_count_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--batch 4 does not split into 3 equal micro-batches"):
        main(["--device", "cpu", "--batch", "4", "--pipeline", "2", "--microbatches", "3", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="runs under torchrun on a multiple of 2 processes; this run has 1"):
        main(["--device", "cpu", "--batch", "4", "--pipeline", "2", "--out", str(tmp_path)])

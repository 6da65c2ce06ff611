"""``python -m fastunet.train --spatial N`` under torchrun on the CPU (gloo): images split by rows over 2 processes
train as one process trains them, 2 replicas of 2 stripes with synchronized BN as DDP over 2 processes does, and
the checkpoints load strictly into the seed U-Net. The stripes' BatchNorm sums its statistics in another order
than ATen's, so the runs agree within rounding, not bit for bit: the first step's loss to 1e-6, the second's
(after one Adam step, which turns the noise in the conv biases' zero gradients into full steps) to 1e-4. The
numerics of the split itself are held to the error rule in tests/test_spatial.py."""

import json

import pytest
import torch
from helpers import SMALL_TRAINING as SMALL
from helpers import torchrun

from fastunet.reference import U_Net as Reference
from fastunet.train import main


def assert_trains_alike(got, want):
    (history, checkpoint, printed), (want_history, _, _) = got, want
    losses, want_losses = history["models"]["fastunet"]["losses"], want_history["models"]["fastunet"]["losses"]
    assert len(losses) == len(want_losses) == 2 and losses[0] != losses[1]
    assert losses[0] == pytest.approx(want_losses[0], rel=1e-6)
    assert losses[1] == pytest.approx(want_losses[1], rel=1e-4)
    Reference(3, 1).load_state_dict(checkpoint["model"], strict=True)
    assert 0 <= history["models"]["fastunet"]["epochs"][0]["dice"] <= 1
    assert printed.count("model      final loss") == 1  # rank 0 alone


def test_two_stripes_train_as_one_process(tmp_path):
    got = torchrun(2, [*SMALL, "--batch", "4", "--spatial", "2"], tmp_path / "sp")
    assert got[0]["config"]["spatial"] == 2 and got[0]["config"]["world_size"] == 2
    assert got[0]["config"]["mmap_threshold"] == 4  # --spatial's default: freed stripes go back to the system
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*SMALL, "--batch", "4", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    want = (json.loads((tmp_path / "one" / "history.json").read_text()), None, None)
    assert_trains_alike(got, want)


def test_two_replicas_of_two_stripes_with_sync_bn_train_as_ddp(tmp_path, ddp_sync_bn_training):
    got = torchrun(4, [*SMALL, "--batch", "2", "--sync-bn", "--spatial", "2"], tmp_path / "mesh")
    want = ddp_sync_bn_training[0]
    assert got[0]["config"]["world_size"] == 4 and want[0]["config"]["world_size"] == 2
    assert_trains_alike(got, want)


@pytest.mark.parametrize("args, message", [
    (["--spatial", "2", "--compare"], "--spatial trains fastunet.U_Net alone"),
    (["--spatial", "2", "--pipeline", "2"], "--spatial trains fastunet.U_Net alone"),
    (["--spatial", "2", "--size", "48"], "--size must be a multiple of 32"),
    (["--spatial", "0"], "--spatial must be at least 1"),
    (["--spatial", "2", "--mmap-threshold", "33"], "--mmap-threshold must be 0"),
])
def test_spatial_options_are_checked(capsys, args, message):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", *args])
    assert message in capsys.readouterr().err


def test_spatial_size_and_process_count_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--spatial 4 needs --size a multiple of 64"):  # the CPU's default size 32
        main(["--device", "cpu", "--spatial", "4", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--spatial 2 runs under torchrun on a multiple of 2 processes"):
        main(["--device", "cpu", "--spatial", "2", "--out", str(tmp_path)])

"""Bad input gets an error that names the problem; edge cases behave as nn's U-Net does."""

import pytest
import torch

import fastunet
from fastunet.reference import U_Net as Reference


@pytest.fixture(scope="module")
def model():
    return fastunet.U_Net(3, 1)


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(3, 32, 32), ValueError, r"4-D input.*unsqueeze\(0\)"),
        (torch.randn(1, 1, 3, 32, 32), ValueError, "4-D input"),
        (torch.randn(2, 4, 32, 32), ValueError, "img_ch=3 but the input has 4 channels"),
        (torch.randn(2, 3, 40, 32), ValueError, "multiples of 16.*40x32.*48x32"),
        (torch.randn(2, 3, 32, 20), ValueError, "multiples of 16.*32x20"),
        (torch.randint(0, 255, (2, 3, 32, 32)), TypeError, "floating-point input.*torch.int64"),
        (torch.randn(2, 3, 32, 32, device="meta"), RuntimeError,
         "input is on meta but the model's parameters are on cpu"),
    ],
)
def test_bad_input_names_the_problem(model, x, error, message):
    with pytest.raises(error, match=message):
        model(x)


def test_non_tensor_input(model):
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        model([[1.0]])


def test_empty_batch_in_eval_returns_empty_output(model):
    model.eval()
    out = model(torch.randn(0, 3, 32, 48))
    assert out.shape == (0, 1, 32, 48)


def test_nan_stays_in_its_own_sample_in_eval():
    model = fastunet.U_Net(3, 1).eval()
    x = torch.randn(3, 3, 32, 32)
    x[1, 0, 5, 7] = float("nan")
    with torch.no_grad():
        out = model(x)
    assert torch.isnan(out[1]).any()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@pytest.mark.parametrize("exact", [False, True])
def test_batch_one_with_1x1_bottleneck_raises_as_batchnorm(exact):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError) as want:
        Reference().train()(x)
    with pytest.raises(ValueError) as got:
        fastunet.U_Net(exact=exact).train()(x)
    assert str(got.value) == str(want.value)


@pytest.mark.filterwarnings("ignore:fastunet. torch.float64 input:RuntimeWarning")  # its warning: test_compat
def test_float64_runs_the_reference_path_and_gradchecks():
    ref = Reference(1, 1).double().eval()
    model = fastunet.U_Net(1, 1).double().eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    assert torch.equal(model(x), ref(x))
    x.requires_grad_()
    # gradcheck of the whole model w.r.t. its input, on a cheap linear functional of the output.
    assert torch.autograd.gradcheck(lambda t: model(t).sum(), (x,), eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)

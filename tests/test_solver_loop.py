"""A third-party training loop replayed end to end with fastunet swapped in for the seed U-Net.

``Solver`` is written here in the style of the seed repository's ``solver.py``: its ``init_weights``
(``seed_init_weights``, which writes ``m.weight.data``), Adam with betas (0.5, 0.999), BCE on sigmoid outputs
flattened per image, a linear learning-rate decay over the last epochs, accuracy/sensitivity/specificity/precision/
F1/Jaccard/Dice on thresholded outputs, the best model (by Jaccard + Dice on the validation set) saved with
``torch.save(model.state_dict())``, then the model deleted, built anew, reloaded from that file and tested. It knows
nothing of fastunet: it takes a U-Net class. Exact mode must give the seed's run bit for bit (every loss, metric,
checkpoint tensor and test metric); fast mode must end close to it.
"""

import pytest
import torch
import torch.nn as nn
from helpers import scratch_dir, seed_init_weights
from torch.utils.data import DataLoader

import fastunet
from fastunet.reference import U_Net as Reference
from fastunet.train import SyntheticShapes


def segmentation_metrics(sr, gt, threshold=0.5):
    """acc, SE, SP, PC, F1, JS, DC of a probability map against a binary mask (the seed repository's definitions)."""
    sr, gt = sr > threshold, gt == gt.max()
    tp, tn = (sr & gt).sum().item(), (~sr & ~gt).sum().item()
    fp, fn = (sr & ~gt).sum().item(), (~sr & gt).sum().item()
    eps = 1e-6
    se, pc = tp / (tp + fn + eps), tp / (tp + fp + eps)
    return {"acc": (tp + tn) / gt.numel(), "SE": se, "SP": tn / (tn + fp + eps), "PC": pc,
            "F1": 2 * se * pc / (se + pc + eps), "JS": tp / (tp + fp + fn + eps),
            "DC": 2 * tp / (2 * tp + fp + fn + eps)}


class Solver:
    """Trains, validates, keeps the best model on disk, reloads it and tests, as the seed repository's Solver."""

    def __init__(self, unet_class, loaders, model_path, *, lr=2e-3, num_epochs=3, num_epochs_decay=2):
        self.unet_class = unet_class
        self.train_loader, self.valid_loader, self.test_loader = loaders
        self.model_path = model_path
        self.lr, self.beta1, self.beta2 = lr, 0.5, 0.999
        self.num_epochs, self.num_epochs_decay = num_epochs, num_epochs_decay
        self.criterion = nn.BCELoss()
        self.log = []
        self.build_model()

    def build_model(self):
        self.unet = self.unet_class(img_ch=3, output_ch=1)
        seed_init_weights(self.unet, "normal")
        self.optimizer = torch.optim.Adam(list(self.unet.parameters()), self.lr, [self.beta1, self.beta2])

    def evaluate(self, loader):
        self.unet.train(False)
        self.unet.eval()
        totals = {}
        with torch.no_grad():
            for images, gt in loader:
                for name, value in segmentation_metrics(torch.sigmoid(self.unet(images)), gt).items():
                    totals[name] = totals.get(name, 0.0) + value / len(loader)
        return totals

    def train(self):
        lr, best_score = self.lr, -1.0
        for epoch in range(self.num_epochs):
            self.unet.train(True)
            for images, gt in self.train_loader:
                sr_probs = torch.sigmoid(self.unet(images))
                loss = self.criterion(sr_probs.view(sr_probs.size(0), -1), gt.view(gt.size(0), -1))
                self.unet.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.log.append(("loss", epoch, loss.item()))
            if (epoch + 1) > (self.num_epochs - self.num_epochs_decay):
                lr -= self.lr / float(self.num_epochs_decay + 1)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            metrics = self.evaluate(self.valid_loader)
            self.log.append(("valid", epoch, metrics))
            score = metrics["JS"] + metrics["DC"]
            if score > best_score:
                best_score, self.best_epoch = score, epoch
                torch.save(self.unet.state_dict(), self.model_path)

    def test(self):
        del self.unet
        self.build_model()
        self.unet.load_state_dict(torch.load(self.model_path))
        return self.evaluate(self.test_loader)


def loaders(seed=0, size=32, batch=4):
    """Synthetic segmentation sets (fastunet.train's shapes with masks): train, validation, test."""
    sets = [SyntheticShapes(n, size=size, img_ch=3, seed=seed + i) for i, n in enumerate((12, 8, 8))]
    return [DataLoader(s, batch_size=batch, shuffle=(i == 0), generator=torch.Generator().manual_seed(seed))
            for i, s in enumerate(sets)]


def run_solver(unet_class, tmp_path, name):
    torch.manual_seed(0)
    solver = Solver(unet_class, loaders(), str(tmp_path / f"{name}.pkl"))
    solver.train()
    return solver, solver.test(), torch.load(solver.model_path)


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """The seed U-Net's run (solver, test metrics, best checkpoint): the same for both modes, so run once."""
    with scratch_dir(tmp_path_factory, "seed") as directory:
        return run_solver(Reference, directory, "seed")


@pytest.mark.parametrize("exact", [True, False])
def test_seed_solver_loop_with_fastunet_swapped_in(exact, tmp_path, seed_run):
    def fastunet_unet(img_ch, output_ch):
        return fastunet.U_Net(img_ch=img_ch, output_ch=output_ch, exact=exact)

    ref, ref_test, ref_best = seed_run
    got, got_test, got_best = run_solver(fastunet_unet, tmp_path, "fastunet")
    losses = [entry[2] for entry in ref.log if entry[0] == "loss"]
    assert losses[-1] < losses[0]  # it learns
    assert list(got_best) == list(ref_best)  # the checkpoint holds the seed's keys
    if exact:
        assert got.log == ref.log
        assert got.best_epoch == ref.best_epoch
        for key, value in ref_best.items():
            assert torch.equal(got_best[key], value), key
        assert got_test == ref_test
    else:
        # Fast mode re-associates arithmetic, and Adam turns rounding-level gradient differences into parameter
        # differences that grow over the steps: the losses track the seed's within 1%; thresholded metrics of
        # a barely trained model do not (outputs sit at the 0.5 threshold), so fast mode's reloaded checkpoint is
        # tested against the seed U-Net loading the same file.
        got_losses = [entry[2] for entry in got.log if entry[0] == "loss"]
        for a, b in zip(got_losses, losses):
            assert abs(a - b) <= 1e-2 * abs(b), (got_losses, losses)
        seed_model = Reference(3, 1)
        seed_model.load_state_dict(got_best)
        got.unet = seed_model
        for name, value in got.evaluate(got.test_loader).items():
            assert abs(got_test[name] - value) <= 1e-3, (name, got_test[name], value)

"""The digits demo's before/after grid: same prompts side by side, each cell framed by the classifier's verdict."""

from __future__ import annotations

from contextlib import nullcontext

import PIL.Image
import pytest
import torch

from genalign.data.digits import DigitsDataset, parse_digit
from genalign.eval.digits import DigitsEvaluator
from genalign.eval.digits_grid import FRAME, RIGHT, WRONG, save_before_after_grid
from genalign.eval.digits_training import DigitsTrainingEvaluator
from genalign.eval.image import prompt_accuracy
from genalign.rewards.digit_classifier import load_digit_classifier


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


def two_sets(n: int = 60):
    """'after' = real held-out digits (mostly read right), 'before' = the same heavily noised (mostly wrong)."""
    held_out = DigitsDataset("held_out", 16)
    after, prompts = held_out.images[:n], held_out.prompts[:n]
    noise = torch.randn(after.shape, generator=torch.Generator().manual_seed(0))
    return (after + 1.2 * noise).clamp(-1, 1), after, prompts


def test_cells_are_framed_by_the_classifier_verdict_and_pair_the_same_prompt(classifier, tmp_path):
    before, after, prompts = two_sets()
    grid = save_before_after_grid(before, after, prompts, classifier, tmp_path / "grid.png", columns=4)
    assert PIL.Image.open(tmp_path / "grid.png").format == "PNG"
    with torch.no_grad():  # the classifier's verdicts, computed here directly
        predicted = {name: classifier(images).argmax(-1) for name, images in (("before", before), ("after", after))}
    digits = torch.tensor([parse_digit(p) for p in prompts])
    assert list(grid.rows) == list(range(10))
    checked = {True: 0, False: 0}
    for r, (digit, indices) in enumerate(grid.rows.items()):
        assert indices == [i for i, d in enumerate(digits.tolist()) if d == digit][:4]  # prompt order, same in both panels
        for c, i in enumerate(indices):
            for p, (name, images) in enumerate((("before", before), ("after", after))):
                top, left = grid.cell(p, r, c)
                right = bool(predicted[name][i] == digit)
                frame = grid.canvas[:, top, left : left + 18]  # the cell's top edge: all in the verdict's colour
                assert torch.equal(frame, torch.tensor(RIGHT if right else WRONG)[:, None].expand(3, 18))
                inside = grid.canvas[:, top + FRAME : top + FRAME + 16, left + FRAME : left + FRAME + 16]
                assert torch.allclose(inside, ((images[i, 0] + 1) / 2).expand(3, -1, -1))
                checked[right] += 1
    assert checked[True] > 0 and checked[False] > 0  # both colours were exercised
    for name, images in (("before", before), ("after", after)):
        assert torch.equal(grid.hits[name], predicted[name] == digits)
        assert grid.accuracy[name] == pytest.approx(prompt_accuracy(classifier, images, prompts))
    assert grid.accuracy["after"] > grid.accuracy["before"]
    with pytest.raises(ValueError, match="one shape"):
        save_before_after_grid(before[:5], after, prompts, classifier, tmp_path / "bad.png")


class ReplayAdapter:
    """Stands in for an ImageDiffusionAdapter: ``sample`` returns fixed images (the "before", then the "after")."""

    def __init__(self, *images: torch.Tensor) -> None:
        self.images = list(images)

    def sample(self, prompts, generator=None, **kwargs):
        return {"images": self.images.pop(0)[: len(prompts)]}

    def ema_weights(self):
        return nullcontext()


def test_training_evaluator_writes_the_before_after_grid_after_training(classifier, tmp_path):
    protocol = DigitsEvaluator(per_digit=3, classifier=classifier, real=DigitsDataset("held_out", 16).images[:40])
    held_out = DigitsDataset("held_out", 16)
    by_digit = [held_out.images[held_out.digits == d][:3] for d in range(10)]
    after = torch.cat(by_digit)  # real digits in the protocol's digit-major prompt order
    before = torch.flip(after, dims=(-1,))
    evaluator = DigitsTrainingEvaluator(protocol, grid_columns=3)
    adapter = ReplayAdapter(before, after)
    first = evaluator(adapter, tag="before", output_dir=tmp_path)
    assert (tmp_path / "samples_before.png").exists() and not (tmp_path / "samples_before_after.png").exists()
    second = evaluator(adapter, tag="after", output_dir=tmp_path)
    assert (tmp_path / "samples_after.png").exists() and (tmp_path / "samples_before_after.png").exists()
    assert torch.equal(torch.load(tmp_path / "samples_before.pt", weights_only=True), before)
    # the grid's accuracies are the protocol's own prompt accuracy of each evaluation
    grid = save_before_after_grid(before, after, protocol.prompts, classifier, tmp_path / "again.png", columns=3)
    assert grid.accuracy == pytest.approx({"before": first["prompt_accuracy"], "after": second["prompt_accuracy"]})

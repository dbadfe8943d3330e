"""The multi-task loss: each term sees only its kinds of samples; OHEM keeps the hardest 70%."""

import math

import pytest
import torch
from torch.nn import functional as F

from jobs.training.losses import (LANDMARK, NEGATIVE, PART, POSITIVE, STAGE_TASK_WEIGHTS,
                                  WING_CURVATURE, WING_WIDTH, box_loss, classification_loss,
                                  hardest_samples, landmark_loss, multitask_loss, task_weights, wing)
from mtcnn.nets import StageOutput, build_stage

KINDS = torch.tensor([NEGATIVE, POSITIVE, PART, LANDMARK, NEGATIVE, POSITIVE, PART, LANDMARK])


def _random_batch(seed: int = 0, n: int = len(KINDS)):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=generator), torch.randn(n, 4, generator=generator),
            torch.randn(n, 10, generator=generator), torch.randn(n, 4, generator=generator),
            torch.randn(n, 10, generator=generator))


def _scramble(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    changed = tensor.clone()
    changed[rows] = changed[rows] * 7.0 + 3.0
    return changed


def test_classification_uses_only_positives_and_negatives():
    logits, *_ = _random_batch()
    other = (KINDS == PART) | (KINDS == LANDMARK)
    before = classification_loss(logits, KINDS)
    after = classification_loss(_scramble(logits, other), KINDS)
    assert torch.equal(before, after)
    mask = ~other
    expected = F.cross_entropy(logits[mask], (KINDS[mask] == POSITIVE).long())
    assert torch.allclose(before, expected)
    # Changing a positive's logits does change it.
    assert not torch.equal(before, classification_loss(_scramble(logits, KINDS == POSITIVE), KINDS))


def test_box_loss_uses_only_positives_and_parts():
    _, boxes, _, box_targets, _ = _random_batch()
    other = (KINDS == NEGATIVE) | (KINDS == LANDMARK)
    before = box_loss(boxes, box_targets, KINDS)
    assert torch.equal(before, box_loss(_scramble(boxes, other), _scramble(box_targets, other), KINDS))
    mask = ~other
    expected = (boxes[mask] - box_targets[mask]).pow(2).sum(dim=1).mean()
    assert torch.allclose(before, expected)
    assert not torch.equal(before, box_loss(_scramble(boxes, KINDS == PART), box_targets, KINDS))


def test_landmark_loss_uses_only_landmark_samples():
    _, _, marks, _, mark_targets = _random_batch()
    other = KINDS != LANDMARK
    before = landmark_loss(marks, mark_targets, KINDS)
    assert torch.equal(before, landmark_loss(_scramble(marks, other), _scramble(mark_targets, other), KINDS))
    expected = (marks[~other] - mark_targets[~other]).pow(2).sum(dim=1).mean()
    assert torch.allclose(before, expected)


def test_empty_masks_give_zero_not_nan_and_keep_gradients_flowing():
    logits, boxes, marks, box_targets, mark_targets = (t.requires_grad_() if i < 3 else t
                                                       for i, t in enumerate(_random_batch()))
    only_parts = torch.full((len(KINDS),), PART)
    only_negatives = torch.full((len(KINDS),), NEGATIVE)
    assert classification_loss(logits, only_parts).item() == 0.0
    assert box_loss(boxes, box_targets, only_negatives).item() == 0.0
    assert landmark_loss(marks, mark_targets, only_negatives).item() == 0.0
    output = StageOutput(logits, boxes, marks)
    terms = multitask_loss(output, only_parts, box_targets, mark_targets, STAGE_TASK_WEIGHTS["pnet"])
    assert math.isfinite(terms.total.item()) and terms.classified == 0 and terms.landmarked == 0
    terms.total.backward()  # an empty task must not break back-propagation
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_task_weights_combine_terms_per_stage():
    logits, boxes, marks, box_targets, mark_targets = _random_batch(3)
    output = StageOutput(logits, boxes, marks)
    for stage, weights in STAGE_TASK_WEIGHTS.items():
        terms = multitask_loss(output, KINDS, box_targets, mark_targets, weights)
        expected = (weights.classification * terms.classification + weights.box * terms.box
                    + weights.landmarks * terms.landmarks)
        assert torch.allclose(terms.total, expected), stage
    assert STAGE_TASK_WEIGHTS["onet"].landmarks == 1.0 and STAGE_TASK_WEIGHTS["pnet"].landmarks == 0.5


def test_a_landmark_weight_replaces_only_the_landmark_term():
    logits, boxes, marks, box_targets, mark_targets = _random_batch(4)
    output = StageOutput(logits, boxes, marks)
    assert task_weights("onet") == STAGE_TASK_WEIGHTS["onet"]
    heavier = task_weights("onet", 4.0)
    assert (heavier.classification, heavier.box, heavier.landmarks) == (1.0, 0.5, 4.0)
    paper = multitask_loss(output, KINDS, box_targets, mark_targets, task_weights("onet"))
    weighted = multitask_loss(output, KINDS, box_targets, mark_targets, heavier)
    assert torch.allclose(weighted.total - paper.total, 3.0 * paper.landmarks)


def test_wing_is_logarithmic_inside_its_width_and_l1_outside_continuously():
    small = torch.tensor([0.0, 0.01, -0.01])
    assert torch.allclose(wing(small), WING_WIDTH * torch.log1p(small.abs() / WING_CURVATURE))
    at = torch.tensor([WING_WIDTH - 1e-6, WING_WIDTH + 1e-6])
    assert abs(float(wing(at)[1] - wing(at)[0])) < 1e-5  # no step at the width
    far = torch.tensor([0.5, 1.0])
    assert torch.allclose(wing(far)[1] - wing(far)[0], torch.tensor(0.5))  # slope 1 outside
    # Its point: an error of 2% of the window still pulls hard, where the squared loss barely does.
    error = torch.tensor([0.02], requires_grad=True)
    wing(error).sum().backward()
    assert float(error.grad) > 10 * (2 * 0.02)


def test_the_wing_landmark_loss_sums_coordinates_over_landmark_samples_only():
    _, _, marks, _, mark_targets = _random_batch(5)
    expected = wing(marks[KINDS == LANDMARK] - mark_targets[KINDS == LANDMARK]).sum(dim=1).mean()
    assert torch.allclose(landmark_loss(marks, mark_targets, KINDS, "wing"), expected)
    assert torch.equal(landmark_loss(_scramble(marks, KINDS != LANDMARK), mark_targets, KINDS, "wing"),
                       landmark_loss(marks, mark_targets, KINDS, "wing"))
    assert float(landmark_loss(marks, mark_targets, KINDS.clone().fill_(NEGATIVE), "wing")) == 0.0
    with pytest.raises(ValueError, match="landmark loss must be one of"):
        landmark_loss(marks, mark_targets, KINDS, "l1")
    output = StageOutput(*_random_batch(5)[:3])
    weights = task_weights("onet")
    l2 = multitask_loss(output, KINDS, _random_batch(5)[3], mark_targets, weights)
    winged = multitask_loss(output, KINDS, _random_batch(5)[3], mark_targets, weights, landmark_form="wing")
    assert torch.allclose(winged.landmarks, expected) and torch.allclose(winged.classification, l2.classification)


def test_works_on_real_stage_outputs_of_every_net():
    for name, size in (("pnet", 12), ("rnet", 24), ("onet", 48)):
        net = build_stage(name)
        output = net(torch.randn(len(KINDS), 3, size, size))
        _, _, _, box_targets, mark_targets = _random_batch()
        terms = multitask_loss(output, KINDS, box_targets, mark_targets, STAGE_TASK_WEIGHTS[name])
        terms.total.backward()
        assert terms.classified == 4 and terms.boxed == 4 and terms.landmarked == 2
        assert 0 <= terms.correct <= terms.classified
        assert net.classifier.weight.grad is not None


def test_ohem_keeps_exactly_the_hardest_seventy_percent():
    losses = torch.tensor([0.1, 5.0, 0.3, 2.0, 0.05, 4.0, 1.0, 0.2, 3.0, 0.7])
    kept = hardest_samples(losses, 0.7)
    assert len(kept) == 7
    assert set(kept.tolist()) == {1, 5, 8, 3, 6, 9, 2}  # the 7 largest losses
    assert len(hardest_samples(torch.rand(100), 0.7)) == 70
    assert len(hardest_samples(torch.rand(1), 0.7)) == 1
    with pytest.raises(ValueError, match="keep_fraction"):
        hardest_samples(losses, 1.5)


def test_ohem_classification_loss_is_the_mean_over_the_hardest():
    generator = torch.Generator().manual_seed(5)
    kinds = torch.tensor([NEGATIVE, POSITIVE] * 10 + [PART] * 5)
    logits = torch.randn(len(kinds), 2, generator=generator)
    mask = kinds != PART
    per_sample = F.cross_entropy(logits[mask], (kinds[mask] == POSITIVE).long(), reduction="none")
    expected = per_sample.sort(descending=True).values[:14].mean()
    ohem = classification_loss(logits, kinds, ohem_keep=0.7)
    assert torch.allclose(ohem, expected)
    assert ohem > classification_loss(logits, kinds)  # the easy 30% no longer dilute it


def test_label_smoothing_is_off_by_default_and_softens_targets():
    logits = torch.tensor([[-3.0, 3.0], [2.0, -2.0]])
    kinds = torch.tensor([POSITIVE, NEGATIVE])
    plain = classification_loss(logits, kinds)
    assert torch.equal(plain, classification_loss(logits, kinds, label_smoothing=0.0))
    assert classification_loss(logits, kinds, label_smoothing=0.2) > plain  # confident and right costs more

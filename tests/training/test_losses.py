import pytest
import torch

from fseft.training.losses import partial_label_loss, per_class_bce_dice
from fseft.errors import ConfigError


def _batch(seed=0, b=2, c=3, n=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, n, n, n, generator=g, requires_grad=True)
    target = (torch.rand(b, c, n, n, n, generator=g) > 0.7).to(torch.uint8)
    return logits, target


def test_unannotated_channels_get_zero_gradient():
    logits, target = _batch()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    partial_label_loss(logits, target, annotated).backward()
    grad = logits.grad.abs().sum(dim=(2, 3, 4))  # (B, C)
    assert torch.all(grad[~annotated] == 0)
    assert torch.all(grad[annotated] > 0)


def test_normalised_by_number_of_annotated_classes():
    logits, target = _batch()
    per_class = per_class_bce_dice(logits, target).detach()
    annotated = torch.tensor([[True, False, True], [False, True, False]])
    expected = ((per_class[0, 0] + per_class[0, 2]) / 2 + per_class[1, 1]) / 2
    assert torch.allclose(partial_label_loss(logits, target, annotated), expected)
    # with every class annotated it is the plain mean of BCE + Dice
    full = torch.ones(2, 3, dtype=torch.bool)
    assert torch.allclose(partial_label_loss(logits, target, full), per_class.mean())


def test_unannotated_targets_do_not_change_the_loss():
    logits, target = _batch()
    annotated = torch.tensor([[True, False, True], [True, True, False]])
    scrambled = target.clone()
    scrambled[0, 1] = 1 - scrambled[0, 1]
    scrambled[1, 2] = 1
    assert torch.equal(partial_label_loss(logits, target, annotated),
                       partial_label_loss(logits, scrambled, annotated))


def test_bce_dice_is_low_for_a_confident_correct_prediction():
    target = torch.zeros(1, 2, 8, 8, 8)
    target[0, 0, 2:6, 2:6, 2:6] = 1  # class 1 empty: its optimum is an empty prediction
    good = (target * 2 - 1) * 30
    bad = -good
    assert per_class_bce_dice(good, target).max() < 1e-3
    assert per_class_bce_dice(bad, target).min() > 1.0


def test_sample_without_annotation_is_an_error():
    logits, target = _batch()
    with pytest.raises(ConfigError):
        partial_label_loss(logits, target, torch.tensor([[True, False, False], [False, False, False]]))

import numpy as np
import pytest

from fseft.evaluation.postprocess import binarize, largest_connected_component


def test_largest_component_removes_small_island():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:10, 2:10, 2:10] = True  # organ
    mask[15:17, 15:17, 15:17] = True  # island
    out = largest_connected_component(mask)
    assert out.dtype == bool
    assert out[2:10, 2:10, 2:10].all()
    assert not out[15:17, 15:17, 15:17].any()
    assert out.sum() == 8**3


def test_corner_touching_voxels_are_one_component():
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # 26-connected
    assert largest_connected_component(mask).sum() == 2


def test_empty_mask_stays_empty():
    assert not largest_connected_component(np.zeros((4, 4, 4), bool)).any()


def test_binarize_thresholds_and_lcc_is_switchable():
    probs = np.zeros((2, 12, 12, 12), np.float32)
    probs[0, 1:5, 1:5, 1:5] = 0.9
    probs[0, 9:11, 9:11, 9:11] = 0.7  # island
    probs[1, 3:6, 3:6, 3:6] = 0.5  # exactly at threshold: background
    with_lcc = binarize(probs, 0.5, largest_component=True)
    without = binarize(probs, 0.5, largest_component=False)
    assert with_lcc.dtype == np.uint8 and with_lcc.shape == probs.shape
    assert with_lcc[0].sum() == 64 and without[0].sum() == 64 + 8
    assert with_lcc[1].sum() == 0
    with pytest.raises(ValueError):
        binarize(probs[0])


def test_multi_part_structures_keep_every_component():
    """The vertebral column (any spelling) and lesions keep all their pieces; organs do not."""
    from fseft.data.structures import is_multi_part
    from fseft.evaluation.postprocess import keep_largest_components

    probs = np.zeros((3, 12, 12, 12), np.float32)
    for s in range(3):
        probs[s, 1:4, 1:4, 1:4] = 0.9
        probs[s, 7:9, 7:9, 7:9] = 0.9  # a second piece
    masks = binarize(probs, 0.5, True, ["liver", "spine", "liver_tumor"])
    assert masks[0].sum() == 27
    assert masks[1].sum() == masks[2].sum() == 27 + 8
    assert binarize(probs, 0.5, True)[1].sum() == 27  # without names every channel is reduced
    assert is_multi_part("Vertebral column") and not is_multi_part("gallbladder")
    with pytest.raises(ValueError, match="structure names"):
        keep_largest_components(probs > 0.5, ["liver"])


def test_structures_a_model_keeps_whole_keep_every_component_and_the_choice_follows_validation():
    from fseft.evaluation.postprocess import choose_largest_component

    probs = np.zeros((2, 12, 12, 12), np.float32)
    probs[:, 1:4, 1:4, 1:4] = 0.9
    probs[:, 7:9, 7:9, 7:9] = 0.9  # a second piece
    masks = binarize(probs, 0.5, True, ["liver", "Pancreas"], keep_whole={"pancreas"})
    assert masks[0].sum() == 27 and masks[1].sum() == 27 + 8
    assert binarize(probs, 0.5, False, ["liver", "pancreas"])[0].sum() == 27 + 8  # no step at all
    # keep the step unless it lowers the validation Dice (a tie keeps it)
    choice = choose_largest_component({"liver": 0.95, "pancreas": 0.68, "aorta": 0.8},
                                      {"liver": 0.94, "pancreas": 0.72, "aorta": 0.8})
    assert choice == {"liver": True, "pancreas": False, "aorta": True}

import pytest

from fseft.data.structures import (
    CLIPDRIVEN_CLASSES,
    FLARE22_LABELS,
    FSEFT_CLASSES,
    SUPREM_CLASSES,
    UnknownStructureError,
    canonical_name,
    canonical_names,
)


def test_class_orders_have_published_sizes():
    assert len(FSEFT_CLASSES) == 29
    assert len(CLIPDRIVEN_CLASSES) == 32
    assert len(SUPREM_CLASSES) == 25
    for group in (FSEFT_CLASSES, CLIPDRIVEN_CLASSES, SUPREM_CLASSES):
        assert len(set(group)) == len(group)


@pytest.mark.parametrize("alias", ["kidney_left", "lKid", "lkidney", "Left Kidney", "kidney-left"])
def test_aliases_resolve_to_one_name(alias):
    assert canonical_name(alias) == "kidney_left"


def test_flare_label_13_is_left_kidney():
    assert FLARE22_LABELS[13] == "kidney_left"


def test_canonical_names_parses_csv_and_dedups():
    assert canonical_names("liver, Gall,gallbladder") == ("liver", "gallbladder")


def test_unknown_structure_strict_raises_with_name():
    with pytest.raises(UnknownStructureError, match="brainstem_xyz"):
        canonical_name("brainstem_xyz", strict=True)
    assert canonical_name("Brainstem XYZ") == "brainstem_xyz"


def test_a_near_miss_of_a_catalogued_name_gets_a_suggestion(caplog):
    import logging

    from fseft.data.structures import UnknownStructureError, canonical_name, did_you_mean
    from fseft.adaptation.runner import _structures

    assert did_you_mean("livr") == " (did you mean 'liver'?)"
    assert did_you_mean("left_hippocampus_tail") == ""
    with pytest.raises(UnknownStructureError, match="did you mean 'gallbladder'"):
        canonical_name("galbladder", strict=True)
    with caplog.at_level(logging.WARNING):
        assert _structures("livr,gallbladder") == ("livr", "gallbladder")
    assert "'livr' is not in the catalogue (did you mean 'liver'?)" in caplog.text


def test_structure_colours_are_fixed_distinct_and_cover_names_outside_the_catalogue():
    from fseft.data.structures import PHANTOM_CLASSES, STRUCTURE_COLORS, structure_color

    assert structure_color("liver") == STRUCTURE_COLORS["liver"] == structure_color("Liver")
    assert structure_color("lKid") == structure_color("kidney_left") != structure_color("kidney_right")
    assert len({structure_color(name) for name in (*FSEFT_CLASSES, *PHANTOM_CLASSES)}) == len(set(FSEFT_CLASSES) | set(PHANTOM_CLASSES))
    novel = structure_color("left_hippocampus_tail")
    assert novel == structure_color("Left hippocampus tail")  # stable: derived from the canonical name
    assert all(0 <= c <= 255 for c in novel) and novel != structure_color("right_hippocampus_tail")

"""The torchvision detector adapter (examples/torchvision_detection.py) computes what the detectors compute: their own
training loss and post-processed boxes from the raw maps, and FCOS's RawHeads passes the preflight with its head's
last convs left whole. Needs torchvision that imports beside this torch (skipped otherwise: CI's CPU torch has none;
the torch 2.14.1 + torchvision 0.29.1 virtualenv runs it)."""
import pytest

pytest.importorskip("torchvision", reason="no torchvision that imports beside this torch (docs: getting started)")

from bench.torchvision_detection import equivalence, inspect  # noqa: E402
from examples import torchvision_detection as tv  # noqa: E402


@pytest.mark.parametrize("family", ["fcos", "retinanet", "ssdlite", "rpn"])
def test_the_adapter_gives_the_detectors_own_loss_and_boxes(family):
    found = equivalence(tv, family, tv.image_size_of(family))
    assert found["loss"] > 0 and found["loss_gap"] <= 1e-5 * found["loss"], found
    assert found["boxes_gap"] <= 1e-4, found  # inf where the detection counts differ


def test_fcos_is_pruned_exactly_with_its_head_convs_whole():
    row = inspect(tv, "fcos", tv.IMAGE)
    assert "refusal" not in row and row["groups"] > 0 and row["left_out"] == 0, row
    assert row["count_error"] == 0 and row["function_error"] < 1e-4, row
    assert row["whole_head_convs"] == ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                                       "head.regression_head.bbox_ctrness"], row

import pytest

from mtcnn.detector import DetectorConfig
from mtcnn.nets import STAGE_NAMES, STAGES, ONet, PNet, RNet, build_stage, stage_spec


def test_stage_table_orders_the_cascade():
    assert STAGE_NAMES == ("pnet", "rnet", "onet")
    assert [STAGES[n].order for n in STAGE_NAMES] == [0, 1, 2]
    assert [STAGES[n].input_size for n in STAGE_NAMES] == [12, 24, 48]
    assert [STAGES[n].net for n in STAGE_NAMES] == [PNet, RNet, ONet]
    assert [STAGES[n].previous for n in STAGE_NAMES] == [None, "pnet", "rnet"]
    assert STAGES["onet"].earlier == ("pnet", "rnet") and STAGES["pnet"].earlier == ()
    # The order indexes the per-stage detector settings.
    assert len(DetectorConfig().thresholds) == len(STAGES)


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="stage must be one of"):
        stage_spec("qnet")
    assert isinstance(build_stage("rnet"), RNet)

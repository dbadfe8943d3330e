"""Where the tests find the shared face datasets, and how a test says it needs one.

The datasets live outside the repository, in `../shared/data` beside it (its README lists them), or
in the folder that the environment variable MTCNN_SHARED_DATA names. A test that needs a dataset
that is not there skips with one line naming it and where to put it; with
MTCNN_REQUIRE_SHARED_DATA=1 (set by `.ci/run`) the same line is a failure, so CI cannot pass by skipping.

    from shared_data import needs_shared_data, shared_data, shared_path

    WIDER = shared_path("wider_face_val_dev")            # a location only: nothing checked
    pytestmark = needs_shared_data("wider_face_val_dev")  # or on one test: checked before its fixtures

    def test_x():
        gt = shared_data("wider_face_val_dev/wider_face_val_bbx_gt.txt")  # the path, or skip/fail here
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT_VARIABLE = "MTCNN_SHARED_DATA"
REQUIRE_VARIABLE = "MTCNN_REQUIRE_SHARED_DATA"
#: ../shared/data beside the repository: where the data is without MTCNN_SHARED_DATA, and where the
#: shipped recipes (configs/shared-data*.yaml) read it from whatever that variable says.
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
MARK = "shared_data"


def data_root() -> Path:
    """The folder holding the shared datasets: $MTCNN_SHARED_DATA, or ../shared/data beside the repository."""
    value = os.environ.get(ROOT_VARIABLE, "").strip()
    return Path(value).expanduser().resolve() if value else DEFAULT_ROOT


def shared_path(name: str) -> Path:
    """Where dataset `name` (a folder or file under the data root, e.g. "cnn_facepoint_5pt/testImageList.txt")
    is, whether or not it is there: for module constants. Tests that read it call shared_data()."""
    return data_root() / name


def required() -> bool:
    """True when MTCNN_REQUIRE_SHARED_DATA is set (to anything but "", 0, false or no): missing data fails."""
    return os.environ.get(REQUIRE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def missing(line: str) -> None:
    """Skip the running test with this one line, or fail it when MTCNN_REQUIRE_SHARED_DATA is set."""
    if required():
        pytest.fail(f"{line} ({REQUIRE_VARIABLE} is set: missing data fails)", pytrace=False)
    pytest.skip(line)


def shared_data(name: str, *, root: Path | None = None) -> Path:
    """The path of dataset `name` under the data root; skips (or fails) the test when it is not there.

    `root` fixes the folder (e.g. DEFAULT_ROOT for files that name ../shared/data themselves).
    Call it from a test or a fixture."""
    folder = data_root() if root is None else root
    path = folder / name
    if not path.exists():
        if root is None:
            where = (f"not found in {folder}; put it there or set {ROOT_VARIABLE} to the folder that holds it "
                     f"(default: ../shared/data beside the repository)")
        else:
            where = f"not found in {folder} (read from there, not from ${ROOT_VARIABLE}); put it there"
        missing(f"needs shared data {name}: {where}")
    return path


def needs_shared_data(*names: str) -> pytest.MarkDecorator:
    """A mark (on a test, a class, or a module's `pytestmark`): the test needs these datasets.
    Checked when the test starts, before its fixtures, by check_marks() (called from conftest.py)."""
    return pytest.mark.shared_data(*names)


def check_marks(item: pytest.Item) -> None:
    """Skip or fail `item` when a dataset its needs_shared_data marks name is not there."""
    for mark in item.iter_markers(MARK):
        for name in mark.args:
            shared_data(name)

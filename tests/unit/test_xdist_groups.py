"""``make test`` runs pytest-xdist with ``--dist loadgroup``: tests marked ``xdist_group`` (one
SmolLM2 run shared by several tests, the README blocks that need another's run folder, the
torchrun launches the DDP tests read) must land on one worker. pytest-xdist marks them by
suffixing the node id with ``@group``; pytest 9.2 stores node ids where pytest-xdist 3.8 cannot
suffix them, and every group was then silently ignored (each worker made the shared runs again):
constraints.txt pins a pytest that works, and this test fails if a pin drifts."""

from pathlib import Path

import pytest

from tests.conftest import SERIAL_FILES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.xdist_group("xdist-groups-check")
def test_a_grouped_test_carries_its_group_under_loadgroup(request):
    if getattr(request.config.option, "loadgroup", False) is not True:
        pytest.skip("not under pytest-xdist --dist loadgroup")
    assert request.node.nodeid.endswith("@xdist-groups-check"), request.node.nodeid


def test_every_serial_test_is_in_a_file_the_serial_phase_collects(request):
    """The serial phase skips test files without ``serial`` in their text (tests/conftest.py): a
    test marked serial from elsewhere (a conftest, a shared mark) would silently never run."""
    serial = request.config.stash[SERIAL_FILES]
    if "tests/e2e/test_max_time.py" not in {str(path.relative_to(ROOT)) for path in serial.values()}:
        pytest.skip("the run did not collect the suite's serial tests")
    missed = [node for node, path in serial.items() if "serial" not in path.read_text()]
    assert not missed, missed

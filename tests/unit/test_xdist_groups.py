"""``make test`` runs pytest-xdist with ``--dist loadgroup``: tests marked ``xdist_group`` (one
SmolLM2 run shared by several tests, the README blocks that need another's run folder, the
torchrun launches the DDP tests read) must land on one worker. pytest-xdist marks them by
suffixing the node id with ``@group``; pytest 9.2 stores node ids where pytest-xdist 3.8 cannot
suffix them, and every group was then silently ignored (each worker made the shared runs again):
constraints.txt pins a pytest that works, and this test fails if a pin drifts."""

import pytest


@pytest.mark.xdist_group("xdist-groups-check")
def test_a_grouped_test_carries_its_group_under_loadgroup(request):
    if getattr(request.config.option, "loadgroup", False) is not True:
        pytest.skip("not under pytest-xdist --dist loadgroup")
    assert request.node.nodeid.endswith("@xdist-groups-check"), request.node.nodeid

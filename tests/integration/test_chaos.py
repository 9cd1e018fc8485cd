"""`make chaos` at smoke size: every kind of fault once, on one cluster (the full run of
100 trials is `make chaos`, reported in docs/CHAOS.md)."""

from __future__ import annotations

import pytest

from tests.chaos.run import FAULTS, run

pytestmark = [pytest.mark.postgres, pytest.mark.rabbit]


@pytest.mark.timeout(1200)
def test_every_fault_once_loses_duplicates_and_wedges_nothing() -> None:
    figures = run(trials=len(FAULTS), seed=7)
    assert set(figures["faults"]) == set(FAULTS)
    assert figures["events_checked"] > 0 and figures["commands_checked"] > 0
    bad = {k: figures[k] for k in ("lost", "duplicated", "stuck", "overlap", "replay_unequal")}
    assert bad == dict.fromkeys(bad, 0), figures["failed_trials"]

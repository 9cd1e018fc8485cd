from __future__ import annotations

import pytest
import torch

from services.trainer.loop import PLATEAU_PATIENCE, LrSchedule


def test_warmup_is_linear_then_cosine_ends_near_zero() -> None:
    schedule = LrSchedule("cosine", 1.0, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert [schedule.lr_at(1, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert schedule.lr_at(3, 5) == pytest.approx(0.5)
    assert schedule.lr_at(4, 9) < 0.01


def test_step_decays_at_each_third() -> None:
    schedule = LrSchedule("step", 1.0, epochs=9, steps_per_epoch=2, warmup_epochs=0)
    assert [schedule.lr_at(e, 0) for e in (1, 4, 7)] == pytest.approx([1.0, 0.1, 0.01])


def test_plateau_halves_after_patience_and_round_trips() -> None:
    schedule = LrSchedule("plateau", 1.0, epochs=20, steps_per_epoch=2, warmup_epochs=0)
    schedule.end_epoch(1, 1.0)
    for epoch in range(2, 3 + PLATEAU_PATIENCE):
        schedule.end_epoch(epoch, 2.0)
    assert schedule.lr_at(5, 0) == pytest.approx(0.5)
    again = LrSchedule("plateau", 1.0, epochs=20, steps_per_epoch=2, warmup_epochs=0)
    again.load_state_dict(schedule.state_dict())
    assert again.lr_at(5, 0) == pytest.approx(0.5)


def test_apply_sets_every_group() -> None:
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [weights[0]]}, {"params": [weights[1]]}], lr=1.0)
    LrSchedule("none", 0.3, epochs=1, steps_per_epoch=1, warmup_epochs=0).apply(optimizer, 1, 0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 0.3]


@pytest.mark.parametrize(("epochs", "warmup_epochs"), [(1, 1), (2, 5)])
def test_warmup_takes_at_most_half_the_job_so_the_rate_still_decays(
    epochs: int, warmup_epochs: int
) -> None:
    """A 1-epoch job with the default warmup, or a warmup longer than the job, used to end
    at its peak rate: the cosine never began."""
    schedule = LrSchedule("cosine", 1.0, epochs, steps_per_epoch=10, warmup_epochs=warmup_epochs)
    half = epochs * 10 // 2
    assert schedule.warmup_steps == half
    assert schedule.lr_at(1, 0) == pytest.approx(1.0 / half)
    assert schedule.lr_at(epochs, 9) < 0.1  # the cosine ran: near 0 at the end

"""The demo training stages' step budget (nextstep_core/demo/stage.py StepBudget): a time budget
fixes the step count after a probe, and a spent budget saves and says how to finish."""

import time

import pytest

from nextstep_core.demo.stage import StepBudget


def test_a_time_budget_fixes_the_step_count_after_the_probe():
    messages = []
    budget = StepBudget(0, minutes=0.5, start=0, log=messages.append, probe=3)
    assert budget.total(0) > 10**8  # still probing
    time.sleep(0.03)
    total = budget.total(3)
    assert 3 < total < 10**8 and budget.total(4) == total
    assert messages == [messages[0]] and f"steps set to {total}" in messages[0]
    with pytest.raises(SystemExit, match="--minutes"):
        StepBudget(0, None, 0, print)


def test_a_spent_time_budget_saves_and_says_how_to_finish():
    messages, saved = [], []
    budget = StepBudget(40, minutes=1e-9, start=5, log=messages.append)
    assert [step for step, _ in budget.run(save_every=100, save=saved.append)] == [5]
    assert saved == [6]
    assert messages == ["stopped at step 6 of 40: the 1e-09 min budget is spent (run again with --steps 40 to finish)"]
    messages.clear()  # spent while still timing the first steps: no step count to give
    assert len(list(StepBudget(0, 1e-9, 0, messages.append).run(save_every=100, save=saved.append))) == 1
    assert messages == ["stopped at step 1: the 1e-09 min budget ran out before the step count was fixed"]
    messages.clear()
    assert len(list(StepBudget(3, None, 0, messages.append).run(save_every=2, save=saved.append))) == 3
    assert saved == [6, 1, 2, 3] and messages == []  # a finished run says nothing

"""How a phase ends (tripletctl/train/phase_end.py), without a model: every end has its exit code, which
stop wins when several happen at one step, when a checkpoint is due, and what an early stop logs and
says. The stops themselves, end to end, are test_loop.py, test_interrupt.py and test_faults.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tripletctl.core.exit_codes import EXIT_DONE, TRAIN_EXIT_CODES
from tripletctl.train.phase_end import (
    EXIT_CODE_OF_END,
    PhaseEnd,
    exploded_weights,
    should_checkpoint,
    stops_after_step,
    unsaved_nonfinite_weights,
)


def test_every_end_has_a_declared_exit_code_and_only_done_or_paused_exit_0():
    assert set(EXIT_CODE_OF_END) == set(PhaseEnd)
    assert set(EXIT_CODE_OF_END.values()) <= set(TRAIN_EXIT_CODES)
    assert {end for end, code in EXIT_CODE_OF_END.items() if code == EXIT_DONE} == {PhaseEnd.DONE, PhaseEnd.PAUSED}


def test_the_status_in_run_json():
    assert PhaseEnd.DONE.status(phase_finished=True) == PhaseEnd.PAUSED.status(phase_finished=True) == "done"
    assert PhaseEnd.PAUSED.status(phase_finished=False) == "paused"
    assert PhaseEnd.INTERRUPTED.status(phase_finished=True) == "interrupted"
    assert PhaseEnd.COLLAPSED.status(phase_finished=False) == "stopped (collapse)"


@pytest.mark.parametrize(
    ("collapse_stop", "stop_now", "budget", "expected"),
    [
        (True, True, 5, PhaseEnd.COLLAPSED),  # a collapse stop first
        (False, True, 5, PhaseEnd.INTERRUPTED),  # then Ctrl-C/SIGTERM
        (False, False, 5, PhaseEnd.PAUSED),  # then the --max-steps budget, reached at global step 5
        (False, False, 6, None),
        (False, False, None, None),
    ],
)
def test_which_stop_wins_at_one_step(collapse_stop, stop_now, budget, expected):
    run, progress = SimpleNamespace(stop_at_global_step=budget), SimpleNamespace(global_step=5)
    assert stops_after_step(run, progress, collapse_stop, stop_now) is expected


def test_a_checkpoint_every_n_steps_at_the_end_and_at_every_stop():
    assert [step for step in range(1, 10) if should_checkpoint(step, 3, False, None)] == [3, 6, 9]
    assert not any(should_checkpoint(step, every, False, None) for step in range(1, 10) for every in (None, 0))
    assert should_checkpoint(4, None, True, None) and should_checkpoint(4, 3, False, PhaseEnd.PAUSED)


class Log(list):
    def append(self, *records: dict) -> None:
        self.extend(records)


def test_exploded_weights_stop_unsaved_with_a_divergence_event():
    ph = SimpleNamespace(index=1, config=SimpleNamespace(name="hard"), log=Log(), last_state={"s": 1}, memory=None)
    outcome = exploded_weights(ph, SimpleNamespace(step=6, global_step=10), "weight norm 3.0 -> 90.0")
    assert outcome.end is PhaseEnd.DIVERGED and outcome.stream_state == {"s": 1}
    assert outcome.reason == "diverging weights after step 7 of phase 1 (hard) (weight norm 3.0 -> 90.0): not saved"
    assert ph.log == [
        {
            "event": "divergence",
            "global_step": 11,
            "phase": "hard",
            "step": 7,
            "action": "stop",
            "reason": "weight norm 3.0 -> 90.0",
        }
    ]
    nonfinite = unsaved_nonfinite_weights(ph, SimpleNamespace(step=7, global_step=11))
    assert nonfinite.end is PhaseEnd.NONFINITE and "after step 7 of phase 1 (hard)" in nonfinite.reason

"""`fedfusion run`'s exit code comes from the SuperLink's final status of the run, not from the log stream."""

from __future__ import annotations

import json

from fedfusion.server.run_outcome import (
    RunOutcome,
    parse_run_status,
    start_failure,
    started_run_id,
    wait_for_outcome,
)


def _listing(run_id: int, status: str, details: str = "") -> str:
    """What `flwr ls --run-id N --format json` prints (flwr/cli/ls.py `_to_json`, abridged)."""
    return json.dumps({"success": True, "runs": [{"run-id": str(run_id), "federation-id": "", "fab-id": "x/fedfusion",
                                                 "status": status, "status-details": details, "elapsed": "00:00:05"}]})


def test_the_run_id_comes_from_flwr_runs_json_answer() -> None:
    assert started_run_id('{"success": true, "run-id": "8127", "federation-id": "", "fab-hash": "ab12cd34"}') == 8127
    assert started_run_id('{"success": false, "error-message": "Connection refused"}') is None
    assert started_run_id("Traceback (most recent call last): ...") is None
    assert start_failure('{"success": false, "error-message": "Could not connect\\n\\nConnection refused"}',
                         "") == "Connection refused"


def test_only_finished_completed_exits_zero() -> None:
    assert RunOutcome(3, "finished:completed").exit_code == 0
    failed = RunOutcome(3, "finished:failed", "ServerApp failed with exception: secure aggregation needs 3 sites")
    assert failed.exit_code == 1
    assert failed.message().startswith("run 3 FAILED: ServerApp failed with exception: secure aggregation needs")
    assert RunOutcome(3, "finished:stopped").exit_code == 1 and "--resume" in RunOutcome(3, "finished:stopped").message()
    assert RunOutcome(3, "running").exit_code == 1


def test_waits_past_running_until_the_superlink_records_the_end() -> None:
    answers = iter([_listing(5, "running"), "", _listing(5, "finished:failed", "ServerApp failed with exception: x")])
    outcome = wait_for_outcome(lambda run_id: next(answers), 5, timeout=10, poll=0.01)
    assert (outcome.status, outcome.details, outcome.exit_code) == ("finished:failed",
                                                                   "ServerApp failed with exception: x", 1)
    assert parse_run_status(_listing(5, "finished:completed"), 6) is None  # another run's row is not this run


def test_a_run_that_never_finishes_is_not_reported_as_success() -> None:
    outcome = wait_for_outcome(lambda run_id: _listing(run_id, "running"), 9, timeout=0.05, poll=0.01)
    assert outcome.exit_code == 1 and "did not finish (status running)" in outcome.message()

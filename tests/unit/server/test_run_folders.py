"""Checkpoints are read with torch.load(weights_only=True): numbers, text and numpy only; a pickled
object is refused before any of its code runs, by resume and by the dashboard alike."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfusion.server.federation import load_checkpoint
from fedfusion.server.run_folders import CheckpointError, load_checkpoint_state


class _Planted:
    """Unpickling this calls ``Path.write_text``: a stand-in for code an attacker hides in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.write_text, (self.marker, "ran"))


def _payload(extra: object = None) -> dict:
    return {"round": 2, "arrays": {"w": np.arange(4, dtype=np.float32)},
            "strategy": {"site_metrics": [{"round": 1, "phase": "train", "site": "A", "auc": np.float64(0.75)}],
                         "rejected": [], "m_t": {"w": np.zeros(4)}},
            "rounds": [{"round": 1, "eval_auc": 0.7, "eval_loss": math.inf}], "config_hash": "abc",
            "run_config": {"num-server-rounds": 3}, "refusals": [], "best": None, "extra": extra}


def test_fedfusion_checkpoints_load_for_resume_and_dashboard(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "round-0002.pt"
    path.parent.mkdir()
    torch.save(_payload(), path)
    state = load_checkpoint(path)
    assert np.array_equal(state["arrays"]["w"], np.arange(4, dtype=np.float32)) and state["round"] == 2
    assert load_checkpoint_state(path)["site_metrics"][0]["auc"] == 0.75


def test_a_checkpoint_with_a_pickled_object_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "planted-code-ran"
    path = tmp_path / "round-0003.pt"
    torch.save(_payload(_Planted(marker)), path)
    with pytest.raises(CheckpointError, match=r"round-0003\.pt: refused to load: it holds Python objects"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_checkpoint_state(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what resume used to do: the planted code runs
    assert marker.read_text() == "ran"

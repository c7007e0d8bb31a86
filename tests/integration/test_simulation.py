"""Flower's simulation runtime (Ray) running our ServerApp/ClientApp on small real-looking sites:
the federation learns, checkpoints every round, and a resumed run ends with the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedfusion.common.config import Schema
from fedfusion.simulations.simulate import run_simulated_federation
from tests.sitegen import OMICS, make_site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def federation_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Three sites in one folder (site-<name>.csv beside a shared images/ folder), the third without omics."""
    root = tmp_path_factory.mktemp("fed")
    frames = []
    for k, site in enumerate(("A", "B", "C")):
        path = make_site(root / f"tmp{site}", n=40, seed=k)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        images = root / "images"
        images.mkdir(exist_ok=True)
        for name in frame["image"]:
            target = images / f"{site}-{Path(name).name}"
            target.write_bytes((path.parent / name).read_bytes())
        frame["image"] = [f"images/{site}-{Path(n).name}" for n in frame["image"]]
        frame["case_id"] = site + frame["case_id"]
        if site == "C":
            frame[list(OMICS)] = ""
        frame.to_csv(root / f"site-{site}.csv", index=False)
        frames.append(frame)
    return root, ["A", "B", "C"]


def _run_config(schema_path: Path, data_dir: Path, run_dir: Path, rounds: int, resume: bool = False) -> dict:
    return {"num-server-rounds": rounds, "min-sites": 3, "seed": 7, "schema": str(schema_path),
            "run-dir": str(run_dir), "data-dir": str(data_dir), "sites": "A,B,C", "local-epochs": 1,
            "local-batch-size": 16, "local-lr": 3e-3, "fusion": "attention", "resume": resume}


def test_federation_learns_and_resume_is_exact(federation_data: tuple[Path, list[str]], schema: Schema,
                                               tmp_path: Path) -> None:
    data_dir, sites = federation_data
    schema_path = schema.save(tmp_path / "schema.json")

    full = run_simulated_federation(_run_config(schema_path, data_dir, tmp_path / "full", 4), len(sites))
    auc = {row["round"]: row["eval_auc"] for row in full.rounds}
    assert auc[4] > max(auc[0], 0.5) and auc[4] > 0.8, auc
    # every site trained every round, and the omics-less site reported no omics examples
    trained = [m for m in full.site_metrics if m["phase"] == "train"]
    assert len(trained) == 12
    assert {m["site"]: m["num-examples-omics"] for m in trained if m["round"] == 1}["C"] == 0
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == [
        f"round-000{r}.pt" for r in range(1, 5)]

    run_simulated_federation(_run_config(schema_path, data_dir, tmp_path / "resumed", 2), len(sites))
    resumed = run_simulated_federation(_run_config(schema_path, data_dir, tmp_path / "resumed", 4, resume=True),
                                       len(sites))
    assert [r["round"] for r in resumed.rounds] == [0, 1, 2, 3, 4]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    assert (tmp_path / "full" / "report.md").read_text().count("| A |") == 1

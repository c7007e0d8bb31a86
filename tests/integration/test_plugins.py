"""The example plug-in (examples/fedfusion-plugin-example) installed for real with pip, then used by the
real ``fedfusion`` executable: listed by ``fedfusion plugins``, its data set built by ``datasets build``,
and its image encoder and fusion trained in a simulated federation whose delivered model holds them.

Nothing of fedfusion's source is edited or imported with the plug-in in this process: the plug-in
reaches the command, Flower's simulation runtime and its worker processes only through PYTHONPATH and
its entry points, as a user's package would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fedfusion-plugin-example"


def _fedfusion() -> str:
    """The console script installed next to this interpreter (the executable users run)."""
    beside = Path(sys.executable).with_name("fedfusion")
    return str(beside) if beside.exists() else shutil.which("fedfusion") or "fedfusion"


def test_installed_example_plugin_is_listed_builds_its_data_set_and_trains_its_encoder(tmp_path: Path) -> None:
    source = tmp_path / "example"  # a copy: pip's build/ and egg-info stay out of the repository
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}

    def fedfusion(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_fedfusion(), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)

    listed = fedfusion("plugins", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    found = {(p["group"], p["name"]): p for p in json.loads(listed.stdout)}
    assert set(found) == {("fedfusion.models", "example"), ("fedfusion.datasets", "example")}
    models, data = found["fedfusion.models", "example"], found["fedfusion.datasets", "example"]
    assert models["distribution"] == "fedfusion-plugin-example 0.1.0" and models["error"] is None
    assert models["registered"] == {"fusion": ["example_mean"], "image backbone": ["example_tinycnn"]}
    assert data["registered"] == {"data set": ["example-wdbc-tabular"]}

    built = fedfusion("datasets", "build", "example-wdbc-tabular", "tabular")
    assert built.returncode == 0, built.stderr[-2000:]
    manifest = (tmp_path / "tabular" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 569 and manifest[0].startswith("case_id,split,label,")
    assert "image" not in manifest[0].split(",") and len(manifest[0].split(",")) == 3 + 20

    out = tmp_path / "run"
    run = fedfusion("simulate", "--dataset", "wdbc-multimodal", "--partition", "iid", "--num-sites", "2",
                    "--backbone", "example_tinycnn", "--fusion", "example_mean", "--rounds", "1", "--no-baselines",
                    "--local-epochs", "1", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    delivered = torch.load(out / "federated" / "model.pt", map_location="cpu", weights_only=False)
    weights = delivered["state_dict"]
    backbone = {k.removeprefix("encoders.image.backbone."): tuple(v.shape) for k, v in weights.items()
                if k.startswith("encoders.image.backbone.")}
    assert backbone == {"stem.0.weight": (8, 1, 3, 3), "stem.1.weight": (8,), "stem.1.bias": (8,),
                        "stage.0.weight": (16, 8, 3, 3), "stage.1.weight": (16,), "stage.1.bias": (16,)}
    assert weights["encoders.image.proj.weight"].shape[1] == 16  # the encoder's 16 pooled features
    assert {k for k in weights if k.startswith("fusion.")} == {"fusion.post.0.weight", "fusion.post.0.bias"}
    assert delivered["run_config"]["image-backbone"] == "example_tinycnn"
    assert delivered["run_config"]["fusion"] == "example_mean"
    assert all(torch.isfinite(v).all() for v in weights.values())

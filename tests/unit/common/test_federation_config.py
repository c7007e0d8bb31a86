"""The run config: pyproject's [tool.flwr.app.config] declares exactly our defaults (Flower
refuses overrides of undeclared keys), and the config hash guards resume."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import DEFAULTS, FederationConfig

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_pyproject_declares_every_default() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == DEFAULTS


def test_parse_and_hash() -> None:
    cfg = FederationConfig.from_run_config({"local-epochs": 3, "fusion": "gated", "num-server-rounds": 5})
    assert (cfg.train.epochs, cfg.model.fusion, cfg.num_rounds, cfg.train.batch_size) == (3, "gated", 5, 64)
    longer = FederationConfig.from_run_config({"local-epochs": 3, "fusion": "gated", "num-server-rounds": 9,
                                               "resume": True})
    assert cfg.config_hash() == longer.config_hash()  # more rounds / resume: same run
    other = FederationConfig.from_run_config({"local-epochs": 4, "fusion": "gated"})
    assert cfg.config_hash() != other.config_hash()
    with pytest.raises(ConfigError, match="num-server-rounds"):
        FederationConfig.from_run_config({"num-server-rounds": 0})

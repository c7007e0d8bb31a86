"""site.toml's [privacy] table: parsed with clear errors, the ledger beside site.toml by default, and
handed to the ClientApp through the SuperNode's node config."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedfusion.client.daemon import SiteConfig
from fedfusion.common.config import ConfigError
from fedfusion.common.privacy_policy import PrivacyPolicy

BASE = '[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n[coordinator]\naddress = "c:1"\ninsecure = true\n'


def _node_config(cfg: SiteConfig) -> dict:
    """``--node-config`` parsed by Flower's own parser, as flower-supernode does."""
    return parse_config_args([cfg.node_config()])


def test_privacy_table_reaches_the_client_app(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        BASE + '[privacy]\nmax-epsilon = 3.0\ndelta = 1e-6\nmin-noise-multiplier = 0.7\naccountant = "prv"\n'
    )
    cfg = SiteConfig.load(config)
    assert cfg.privacy.required and cfg.privacy.ledger == str(tmp_path.resolve() / "privacy-ledger.json")
    node = _node_config(cfg)
    assert node["site-id"] == "A" and node["privacy-max-epsilon"] == "3.0"
    assert PrivacyPolicy.from_node_config(node) == cfg.privacy


def test_site_without_privacy_table_still_names_its_ledger(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(BASE)
    cfg = SiteConfig.load(config)
    assert not cfg.privacy.required
    assert _node_config(cfg)["privacy-ledger"] == str(tmp_path.resolve() / "privacy-ledger.json")
    assert "privacy-max-epsilon" not in _node_config(cfg)


def test_bad_privacy_table_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(BASE + "[privacy]\nmax-epsilon = 3.0\nmax-grad-norm = 0\n")
    with pytest.raises(ConfigError, match=r"site\.toml.*max-grad-norm must be > 0"):
        SiteConfig.load(config)

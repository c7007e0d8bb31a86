"""site.toml parsing and the SuperNode command: clear errors, and no start on bad data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedfusion.client.daemon import SiteConfig, start_site, supernode_command
from fedfusion.common.config import ConfigError, Schema


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = _write(tmp_path / "site.toml", '[site]\nid = "A"\nmanifest = "data/m.csv"\nschema = "kit/s.json"\n'
                    '[coordinator]\naddress = "coord:9092"\nroot-certificates = "kit/ca.pem"\n')
    cfg = SiteConfig.load(config)
    assert cfg.manifest == (tmp_path / "data" / "m.csv").resolve() and cfg.port == 9094
    cmd = supernode_command(cfg)
    assert cmd[cmd.index("--superlink") + 1] == "coord:9092"
    assert cmd[cmd.index("--root-certificates") + 1] == str((tmp_path / "kit" / "ca.pem").resolve())
    assert "--insecure" not in cmd
    assert f'manifest="{cfg.manifest}"' in cmd[cmd.index("--node-config") + 1]
    assert 'site-id="A"' in cmd[cmd.index("--node-config") + 1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[site]\nid = "A"\n', "missing [site] manifest, [site] schema, [coordinator] address"),
        ('[site]\nid = "A"\nmanifest = "m"\nschema = "s"\n[coordinator]\naddress = "c:1"\n', "root-certificates"),
        ("[site\n", "not valid TOML"),
        ('[site]\nid="A"\nmanifest="m"\nschema="s"\n[coordinator]\naddress="c:1"\ninsecure=true\n[supernode]\n'
         'port="x"\n', "port must be an integer"),
    ],
)
def test_bad_site_config_is_named(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SiteConfig.load(_write(tmp_path / "site.toml", text))
    assert needle in str(caught.value) and "site.toml" in str(caught.value)


def test_bad_manifest_stops_before_the_supernode(tmp_path: Path, site: Path, schema: Schema,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[2, "age"] = "old"
    frame.to_csv(site, index=False)
    schema_path = schema.save(tmp_path / "schema.json")
    config = _write(tmp_path / "site.toml", f'[site]\nid = "A"\nmanifest = "{site}"\nschema = "{schema_path}"\n'
                    '[coordinator]\naddress = "127.0.0.1:1"\ninsecure = true\n')
    started: list[list[str]] = []
    monkeypatch.setattr("subprocess.Popen", lambda cmd, **_: started.append(cmd))
    assert start_site(config) == 2
    assert started == []
    out = capsys.readouterr()
    assert "line 4" in out.out and "'age'" in out.out and "not starting" in out.err


def test_warm_site_runs_flowers_supernode_with_process_isolation(tmp_path: Path) -> None:
    from fedfusion.client.daemon import warm_superexec_command

    config = _write(tmp_path / "site.toml", '[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n'
                    '[coordinator]\naddress = "coord:9092"\ninsecure = true\n[supernode]\nport = 9500\n'
                    "poll-interval = 0.5\n")
    cfg = SiteConfig.load(config)
    cmd = supernode_command(cfg)
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--poll-interval") + 1] == "0.5"
    exec_cmd = warm_superexec_command(cfg, supernode_pid=4242)
    assert exec_cmd[exec_cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9500"
    assert exec_cmd[exec_cmd.index("--parent-pid") + 1] == "4242"
    cold = SiteConfig.load(_write(tmp_path / "cold.toml", config.read_text() + "warm = false\n"))
    assert "--isolation" not in supernode_command(cold)


def test_bad_poll_interval_is_named(tmp_path: Path) -> None:
    config = _write(tmp_path / "site.toml", '[site]\nid = "A"\nmanifest = "m"\nschema = "s"\n'
                    '[coordinator]\naddress = "c:1"\ninsecure = true\n[supernode]\npoll-interval = 0\n')
    with pytest.raises(ConfigError, match="poll-interval must be a number of seconds between 0.01 and 60"):
        SiteConfig.load(config)


def test_max_restarts_is_parsed_and_checked(tmp_path: Path) -> None:
    base = '[site]\nid = "A"\nmanifest = "m"\nschema = "s"\n[coordinator]\naddress = "c:1"\ninsecure = true\n'
    assert SiteConfig.load(_write(tmp_path / "a.toml", base)).max_restarts is None
    assert SiteConfig.load(_write(tmp_path / "b.toml", base + "[supernode]\nmax-restarts = 0\n")).max_restarts == 0
    with pytest.raises(ConfigError, match="max-restarts must be a whole number"):
        SiteConfig.load(_write(tmp_path / "c.toml", base + "[supernode]\nmax-restarts = -1\n"))


def test_a_site_can_require_secure_aggregation_through_node_config(tmp_path: Path) -> None:
    base = '[site]\nid = "A"\nmanifest = "m"\nschema = "s"\n{extra}[coordinator]\naddress = "c:1"\ninsecure = true\n'
    plain = SiteConfig.load(_write(tmp_path / "a.toml", base.format(extra="")))
    assert "require-secure-aggregation" not in plain.node_config()
    strict = SiteConfig.load(_write(tmp_path / "b.toml", base.format(extra="require-secure-aggregation = true\n")))
    assert 'require-secure-aggregation="true"' in strict.node_config()

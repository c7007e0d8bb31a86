"""``fedfusion site start site.toml``: preflight the site's data, then run Flower's SuperNode.

The site config is the one file hospital IT edits::

    [site]
    id = "study-16"
    manifest = "/data/fedfusion/manifest.csv"   # relative paths resolve against this file's folder
    schema = "/kit/schema.json"
    device = "auto"                              # or "cpu", "cuda", "cuda:1"

    [coordinator]
    address = "coordinator.example.org:9092"
    root-certificates = "/kit/ca.pem"            # TLS (default); or insecure = true for local development

    [supernode]
    port = 9094                                  # local Runtime API port; one per SuperNode on a host

Nothing is sent before ``site check`` passes; the SuperNode retries the coordinator forever by
default (Flower's own reconnect), so an outage at the coordinator needs no action at the site.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedfusion.client.site_check import EXIT_INVALID, check_site
from fedfusion.common.config import ConfigError
from fedfusion.common.flower_tools import executable, tool_env


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    manifest: Path
    schema: Path
    address: str
    device: str = "auto"
    insecure: bool = False
    root_certificates: Path | None = None
    port: int = 9094
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"site config not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        site, coordinator = raw.get("site", {}), raw.get("coordinator", {})
        supernode = raw.get("supernode", {})
        missing = [f"[site] {k}" for k in ("id", "manifest", "schema") if k not in site]
        missing += ["[coordinator] address"] if "address" not in coordinator else []
        if missing:
            raise ConfigError(f"{path}: missing {', '.join(missing)}")
        insecure = bool(coordinator.get("insecure", False))
        root = coordinator.get("root-certificates")
        if not insecure and not root:
            raise ConfigError(f"{path}: [coordinator] needs root-certificates (the CA from the coordinator's kit) "
                              "or insecure = true for local development")

        def resolve(value: str) -> Path:
            candidate = Path(value)
            return candidate if candidate.is_absolute() else (path.parent / candidate).resolve()

        try:
            port = int(supernode.get("port", 9094))
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: [supernode] port must be an integer") from None
        return cls(site_id=str(site["id"]), manifest=resolve(site["manifest"]), schema=resolve(site["schema"]),
                   address=str(coordinator["address"]), device=str(site.get("device", "auto")),
                   insecure=insecure, root_certificates=resolve(root) if root else None, port=port, source=path)

    def node_config(self) -> str:
        """Flower's ``--node-config`` string: what the ClientApp reads to find this site's data."""
        pairs = {"manifest": str(self.manifest), "schema": str(self.schema), "site-id": self.site_id,
                 "device": self.device}
        return " ".join(f'{k}="{v}"' for k, v in pairs.items())


def supernode_command(cfg: SiteConfig) -> list[str]:
    """``flower-superlink``'s counterpart at the site, with the site's data named in node config."""
    cmd = [executable("flower-supernode"), "--superlink", cfg.address, "--port", str(cfg.port),
           "--node-config", cfg.node_config()]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(cfg.root_certificates)]
    return cmd


def start_site(config_path: str | Path) -> int:
    """Preflight (``site check``), then run the SuperNode in the foreground; return its exit code."""
    try:
        cfg = SiteConfig.load(config_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    code = check_site(cfg.manifest, cfg.schema, check_images=True)
    if code != 0:
        print(f"site {cfg.site_id}: not starting, fix the manifest first", file=sys.stderr)
        return code
    if cfg.insecure:
        print("WARNING: insecure = true: this site's traffic to the coordinator is NOT encrypted. "
              "Use it only for local development.", file=sys.stderr)
    try:
        return subprocess.call(supernode_command(cfg), env=tool_env())
    except KeyboardInterrupt:
        return 130

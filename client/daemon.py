"""``fedfusion site start site.toml``: preflight the site's data, then run Flower's SuperNode.

The site config is the one file hospital IT edits::

    [site]
    id = "study-16"
    manifest = "/data/fedfusion/manifest.csv"   # relative paths resolve against this file's folder
    schema = "/kit/schema.json"
    device = "auto"                              # or "cpu", "cuda", "cuda:1"
    require-secure-aggregation = false           # true: never send an update unmasked, whatever a run asks
    min-eval-cases = 20                          # a smaller test/val split answers evaluations with counts only

    [coordinator]
    address = "coordinator.example.org:9092"
    root-certificates = "/kit/ca.pem"            # TLS (default); or insecure = true for local development

    [auth]                                       # SuperNode authentication (kit from `fedfusion provision`)
    private-key = "/kit/site.key"                # OpenSSH ECDSA key; the coordinator registered its public half
    public-key = "/kit/site.pub"                 # optional: checked against private-key before connecting

    [supernode]
    port = 9094                                  # local Runtime API port; one per SuperNode on a host
    warm = true                                  # ClientApps forked from a preloaded process (see below)
    poll-interval = 0.25                         # seconds between polls of the coordinator while idle
    # max-restarts = 10                          # default: restart the SuperNode forever (with backoff)

    [privacy]                                    # optional; with it the site trains only with DP-SGD
    max-epsilon = 3.0                            # the most ε this site spends on one study, ever
    delta = 1e-5
    max-grad-norm = 1.0                          # largest per-sample clipping norm a run may use
    min-noise-multiplier = 0.5                   # smallest noise multiplier a run may use
    accountant = "rdp"                           # rdp | prv | gdp
    # ledger = "privacy-ledger.json"             # default: beside this file; keep it with the site's state
    # max-epsilon-all-studies = 8.0              # cap over every study together; default: max-epsilon

    [federation]
    roster = "/kit/roster.json"                  # the federation's sites and their public keys (from the kit);
                                                 # without it the site refuses secure aggregation
    [secure-aggregation]                         # this site's bounds, whatever a run asks (defaults shown)
    min-sites = 3                                # fewest sites in a round and in an unmasked sum
    allow-two-sites = false                      # true only for a 2-site test bed
    min-degree = 0                               # fewest graph neighbours; 0 = the library default for n sites
    min-threshold = 0.667                        # threshold >= this fraction of degree + 1 share holders

    [approval]                                   # only these bundles run; apps = [] refuses all (kits ship it)
    apps = ["<sha256 from the coordinator's `fedfusion app-hash`>"]

Nothing is sent before ``site check`` passes; the SuperNode retries the coordinator forever by
default (Flower's own reconnect), so an outage at the coordinator needs no action at the site.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fedfusion.client.approval import normalise_hashes
from fedfusion.client.eval_release import DEFAULT_MIN_EVAL_CASES, parse_min_eval_cases
from fedfusion.client.eval_release import NODE_CONFIG_KEY as EVAL_NODE_CONFIG_KEY
from fedfusion.client.site_check import EXIT_INVALID, check_site
from fedfusion.common.config import ConfigError, read_site_toml
from fedfusion.common.flower_tools import tool_env
from fedfusion.common.privacy_policy import LEDGER_FILENAME, PrivacyPolicy


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    manifest: Path
    schema: Path
    address: str
    device: str = "auto"
    insecure: bool = False
    root_certificates: Path | None = None
    auth_private_key: Path | None = None  # [auth] private-key: Flower signs every Fleet request with it
    auth_public_key: Path | None = None  # [auth] public-key: only checked against the private key
    port: int = 9094
    warm: bool = True
    poll_interval: float = 0.25
    max_restarts: int | None = None  # None: the supervisor restarts the SuperNode forever
    source: Path | None = None
    privacy: PrivacyPolicy = PrivacyPolicy()
    require_secure_aggregation: bool = False  # the site sends updates only masked, whatever the run config says
    approved_apps: frozenset[str] | None = None  # None: no [approval] table, every bundle may run
    secure_aggregation: tuple[tuple[str, str], ...] = ()  # [federation] roster + [secure-aggregation] node config
    min_eval_cases: int = DEFAULT_MIN_EVAL_CASES  # [site] min-eval-cases (client/eval_release.py)

    @classmethod
    def load(cls, path: str | Path) -> SiteConfig:
        path = Path(path)
        raw = read_site_toml(path)
        for name in ("site", "coordinator", "supernode", "privacy", "approval"):
            if name in raw and not isinstance(raw[name], dict):
                raise ConfigError(f"{path}: [{name}] must be a table, got {name} = {raw[name]!r}")
        site, coordinator = raw.get("site", {}), raw.get("coordinator", {})
        supernode = raw.get("supernode", {})
        missing = [f"[site] {k}" for k in ("id", "manifest", "schema") if k not in site]
        missing += ["[coordinator] address"] if "address" not in coordinator else []
        if missing:
            raise ConfigError(f"{path}: missing {', '.join(missing)}")
        for table, key in (("site", "manifest"), ("site", "schema"), ("coordinator", "root-certificates")):
            value = raw[table].get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{path}: [{table}] {key} must be a file path (a string), got {value!r}")
        insecure = _flag(coordinator, "insecure", False, path, "coordinator")
        root = coordinator.get("root-certificates")
        if not insecure and not root:
            raise ConfigError(f"{path}: [coordinator] needs root-certificates (the CA from the coordinator's kit) "
                              "or insecure = true for local development")

        def resolve(value: str) -> Path:
            candidate = Path(value)
            return candidate if candidate.is_absolute() else (path.parent / candidate).resolve()

        port_value = supernode.get("port", 9094)
        try:
            if isinstance(port_value, bool | float):
                raise TypeError(port_value)
            port = int(port_value)
        except (TypeError, ValueError):
            port = -1
        if not 1 <= port <= 65535:
            raise ConfigError(f"{path}: [supernode] port must be an integer between 1 and 65535, "
                              f"got {port_value!r}")
        try:
            if isinstance(supernode.get("poll-interval"), bool):
                raise TypeError("a boolean is not a number of seconds")
            poll_interval = float(supernode.get("poll-interval", 0.25))
        except (TypeError, ValueError):
            poll_interval = -1.0
        max_restarts = supernode.get("max-restarts")
        if max_restarts is not None and (not isinstance(max_restarts, int) or isinstance(max_restarts, bool)
                                         or max_restarts < 0):
            raise ConfigError(f"{path}: [supernode] max-restarts must be a whole number >= 0, got {max_restarts!r}")
        if not 0.01 <= poll_interval <= 60:
            raise ConfigError(f"{path}: [supernode] poll-interval must be a number of seconds between 0.01 and 60, "
                              f"got {supernode.get('poll-interval')!r}")
        return cls(site_id=str(site["id"]), manifest=resolve(site["manifest"]), schema=resolve(site["schema"]),
                   address=str(coordinator["address"]), device=str(site.get("device", "auto")),
                   insecure=insecure, root_certificates=resolve(root) if root else None,
                   **_auth_keys(raw, path, insecure, resolve), port=port,
                   warm=_flag(supernode, "warm", True, path, "supernode"), poll_interval=poll_interval,
                   max_restarts=max_restarts, source=path,
                   require_secure_aggregation=_flag(site, "require-secure-aggregation", False, path, "site"),
                   privacy=_privacy_policy(raw, path), approved_apps=_approved_apps(raw, path),
                   secure_aggregation=_secure_aggregation(raw, path, resolve),
                   min_eval_cases=parse_min_eval_cases(site.get("min-eval-cases", DEFAULT_MIN_EVAL_CASES),
                                                       f"{path}: [site]"))

    def node_config(self) -> str:
        """Flower's ``--node-config`` string: what the ClientApp reads to find this site's data."""
        pairs = {"manifest": str(self.manifest), "schema": str(self.schema), "site-id": self.site_id,
                 "device": self.device, **self.privacy.node_config()}
        pairs[EVAL_NODE_CONFIG_KEY] = str(self.min_eval_cases)  # read by client/eval_release.py
        if self.auth_private_key is not None and "signing-key" not in pairs:  # replies are signed with it
            pairs["signing-key"] = str(self.auth_private_key)  # (client/reply_signing.py, secure agg.)
        if self.require_secure_aggregation:  # checked by client/secure_aggregation.refuse_unmasked_update
            pairs["require-secure-aggregation"] = "true"
        pairs.update(self.secure_aggregation)  # roster and policy: read by client/secagg_identity.py
        if self.source is not None:  # every reply is recorded here before it leaves (client/audit_mod.py)
            from fedfusion.client.audit import audit_path_for

            pairs["audit-log"] = str(audit_path_for(self.source))
        return " ".join(f'{k}="{v}"' for k, v in pairs.items())


def _secure_aggregation(raw: dict, path: Path, resolve: Callable[[str], Path]) -> tuple[tuple[str, str], ...]:
    """``[federation] roster`` and ``[secure-aggregation]`` (client/secagg_identity.py parses them)."""
    from fedfusion.client.secagg_identity import node_config_from_site_toml

    auth = raw.get("auth")
    key = auth.get("private-key") if isinstance(auth, dict) else None
    try:
        pairs = node_config_from_site_toml(raw, path, resolve(key) if isinstance(key, str) else None)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return tuple(sorted(pairs.items()))


def _flag(table: dict, key: str, default: bool, path: Path, name: str) -> bool:
    """A true/false setting; a string such as "false" is refused rather than read as True."""
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: [{name}] {key} must be true or false (no quotes), got {value!r}")
    return value


def _approved_apps(raw: dict, path: Path) -> frozenset[str] | None:
    """``[approval] apps`` of site.toml; approval is enforced by the warm SuperExec, so it needs warm = true."""
    table = raw.get("approval")
    if table is None:
        return None
    apps = table.get("apps")
    if not isinstance(apps, list):
        raise ConfigError(f"{path}: [approval] apps must be a list of SHA-256 hashes (an empty list approves nothing)")
    if not raw.get("supernode", {}).get("warm", True):
        raise ConfigError(f"{path}: [approval] needs [supernode] warm = true: the check runs in fedfusion's "
                          "SuperExec, before Flower loads the bundle")
    try:
        return normalise_hashes(apps, f"{path}: [approval] apps")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _privacy_policy(raw: dict, path: Path) -> PrivacyPolicy:
    """``[privacy]`` of site.toml (none: no policy); the ledger defaults to a file beside site.toml.

    The site's audit log rides along as the ledger's witness: a ledger file missing while the log
    shows ε spent is refused, not read as empty (client/ledger.py)."""
    from fedfusion.client.audit import audit_path_for

    policy = _privacy_table(raw, path)
    return replace(policy, audit_log=str(audit_path_for(path)))


def _privacy_table(raw: dict, path: Path) -> PrivacyPolicy:
    default_ledger = str((path.parent / LEDGER_FILENAME).resolve())
    table = raw.get("privacy")
    if table is None:
        return PrivacyPolicy(ledger=default_ledger)
    for key, value in table.items():
        text_key = key in ("accountant", "ledger")
        if isinstance(value, bool) or (text_key and not isinstance(value, str)) or isinstance(value, list | dict):
            expected = "a string" if text_key else "a number"
            raise ConfigError(f"{path}: [privacy] {key} must be {expected}, got {value!r}")
    try:
        policy = PrivacyPolicy.from_table(table, str(path), base_dir=path.parent.resolve())
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return policy if policy.ledger else replace(policy, ledger=default_ledger)


def _auth_keys(raw: dict, path: Path, insecure: bool, resolve: Callable[[str], Path]) -> dict[str, Path | None]:
    """``[auth]`` of site.toml: the site's SuperNode key pair (files are checked by ``check_auth_keys``)."""
    table = raw.get("auth")
    if table is None:
        return {}
    if not isinstance(table, dict) or not isinstance(table.get("private-key"), str):
        raise ConfigError(f"{path}: [auth] needs private-key = \"site.key\" (the key file from the site's kit)")
    if insecure:
        raise ConfigError(f"{path}: [auth] needs TLS: Flower sends the site's key only over an encrypted connection; "
                          "remove insecure = true and set [coordinator] root-certificates")
    public = table.get("public-key")
    if public is not None and not isinstance(public, str):
        raise ConfigError(f"{path}: [auth] public-key must be a file path")
    return {"auth_private_key": resolve(table["private-key"]), "auth_public_key": resolve(public) if public else None}


def check_auth_keys(cfg: SiteConfig) -> list[str]:
    """Refuse a site key Flower could not use, before connecting; return warnings worth printing.

    Flower 1.41 wants an unencrypted OpenSSH EC private key on a NIST curve
    (``flwr/supernode/cli/flower_supernode.py``, ``_try_setup_client_authentication``); a key pair
    whose halves do not match would only show up as "Failed to activate SuperNode" at the coordinator.
    """
    if cfg.auth_private_key is None:
        return []
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_path, where = cfg.auth_private_key, f"{cfg.source or 'site.toml'}: [auth] private-key"
    try:
        data = key_path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{where} {key_path}: cannot read it ({err.strerror}); it is site.key from the kit (or the "
                          "one `fedfusion site keygen` made here), readable by the user running 'fedfusion site start'"
                          ) from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{where} {key_path}: not an unencrypted OpenSSH private key (use site.key from the kit "
                          "that 'fedfusion provision' wrote)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{where} {key_path}: Flower's node authentication needs an ECDSA key, not "
                          f"{type(key).__name__.removeprefix('_')}")
    if cfg.auth_public_key is not None:
        try:
            public = serialization.load_ssh_public_key(cfg.auth_public_key.read_bytes())
        except (OSError, ValueError, UnsupportedAlgorithm) as err:
            raise ConfigError(f"{cfg.source or 'site.toml'}: [auth] public-key {cfg.auth_public_key}: "
                              f"not a readable OpenSSH public key ({err})") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != key.public_key(
                ).public_numbers():
            raise ConfigError(f"{where} and public-key do not belong together: the coordinator registered the "
                              "public key, so this site would be refused. Use the two files from the same kit")
    warnings = []
    if key_path.stat().st_mode & 0o007:  # group access is how Kubernetes (fsGroup) shares a Secret with the pod
        warnings.append(f"WARNING: {key_path} is readable by every user on this host; restrict it: "
                        f"chmod 600 {key_path}")
    return warnings


def supernode_command(cfg: SiteConfig) -> list[str]:
    """``flower-superlink``'s counterpart at the site, with the site's data named in node config."""
    # Flower's `flower-supernode`, run through the runner that only shortens its idle poll.
    cmd = [sys.executable, "-m", "fedfusion.client.supernode_runner", "--poll-interval", str(cfg.poll_interval),
           "--superlink", cfg.address, "--port", str(cfg.port), "--node-config", cfg.node_config()]
    if cfg.warm:
        cmd += ["--isolation", "process"]  # the warm SuperExec below runs the ClientApps
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(cfg.root_certificates)]
        if cfg.auth_private_key is not None:  # Flower derives the public key from it (1.41)
            cmd += ["--auth-supernode-private-key", str(cfg.auth_private_key)]
    return cmd


def warm_superexec_command(cfg: SiteConfig, supernode_pid: int) -> list[str]:
    """The warm SuperExec serving this SuperNode's local Runtime API (loopback, inside the host)."""
    cmd = [sys.executable, "-m", "fedfusion.client.warm_executor", "--runtime-api-address",
           f"127.0.0.1:{cfg.port}", "--parent-pid", str(supernode_pid)]
    if cfg.approved_apps is not None:  # an empty allow-list approves nothing, not everything
        cmd += ["--approved-apps", ",".join(sorted(cfg.approved_apps))]
    return cmd


def start_site(config_path: str | Path) -> int:
    """Preflight (``site check``), then run the SuperNode in the foreground; return its exit code."""
    from fedfusion.common.flower_adapter import UnverifiedFlowerError, check_flower_version

    try:
        check_flower_version("fedfusion site start")
    except UnverifiedFlowerError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    try:
        cfg = SiteConfig.load(config_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    try:
        for warning in check_auth_keys(cfg):
            print(warning, file=sys.stderr)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if not cfg.insecure and cfg.auth_private_key is None:
        print("note: no [auth] private-key: this site can join only a coordinator started with --no-node-auth",
              file=sys.stderr)
    from fedfusion.client.ledger import PrivacyLedger
    from fedfusion.common.privacy_policy import PrivacyError

    try:  # a lost ledger would silently reset every budget: refuse before connecting
        PrivacyLedger.for_policy(cfg.privacy, cfg.site_id).check_present()
    except PrivacyError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    code = check_site(cfg.manifest, cfg.schema, check_images=True)
    if code != 0:
        print(f"site {cfg.site_id}: not starting, fix the manifest first", file=sys.stderr)
        return code
    if cfg.insecure:
        print("WARNING: insecure = true: this site's traffic to the coordinator is NOT encrypted. "
              "Use it only for local development.", file=sys.stderr)
    return _run_site_processes(cfg)


def status_path_for(cfg: SiteConfig) -> Path:
    """``site-status.json`` beside the audit log: on the site's writable state volume, not the read-only kit."""
    from fedfusion.client.audit import audit_path_for

    if cfg.source is None:
        raise ConfigError("the site config has no file; cannot place its status file")
    return audit_path_for(cfg.source).with_name("site-status.json")


def _run_site_processes(cfg: SiteConfig) -> int:
    """Supervise the SuperNode (and, when warm, its SuperExec): restarts with backoff, status file, JSON logs."""
    from fedfusion.client.supervisor import supervise

    def helpers(supernode_pid: int) -> list[list[str]]:
        return [warm_superexec_command(cfg, supernode_pid)] if cfg.warm else []

    return supervise(cfg.site_id, supernode_command(cfg), helpers, status_path_for(cfg), env=tool_env(),
                     max_restarts=cfg.max_restarts)

"""Static checks of deploy/: no Docker engine, Helm or systemd runs here, so these keep the files true.

Every command a container, pod or unit runs is parsed by the real ``fedfusion`` argument parser, every
file the Dockerfile copies must exist, every volume and path must line up between compose, the kits,
the Helm chart and the systemd units.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from fedfusion.cli import build_parser
from fedfusion.client.audit import audit_path_for
from fedfusion.client.daemon import SiteConfig

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "fedfusion"
SYSTEMD = DEPLOY / "systemd"
LEDGER_MOUNT = "/var/lib/fedfusion"  # where every deployment keeps a site's ledger and audit log


# --- the fedfusion command line --------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse with the real CLI; fail the test (not exit) when argparse rejects the command."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"'fedfusion {shlex.join(argv)}' is not a valid fedfusion command: {stderr.getvalue().strip()}")


def _subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _options(path: list[str]) -> set[str]:
    return {opt for action in _subparser(path)._actions for opt in action.option_strings}


def _expect(argv: list[str], command: str) -> argparse.Namespace:
    """``argv`` must run ``command`` ("site start", "coordinator start") of fedfusion."""
    args = _parse(argv)
    handler = {"site start": "_cmd_site_start", "coordinator start": "_cmd_coordinator_start"}[command]
    assert args.func.__name__ == handler, f"{argv} runs {args.func.__name__}, expected {command}"
    return args


def _coordinator_default_port() -> int:
    return int(_subparser(["coordinator", "start"]).get_default("port"))


# --- Dockerfile ------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _dockerfile():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _json_list(text: str) -> list[str]:
    value = yaml.safe_load(text)  # exec-form instructions are JSON arrays, a subset of YAML
    assert isinstance(value, list), f"expected exec form (a JSON array), got {text!r}"
    return [str(v) for v in value]


def test_dockerfile_is_multi_stage_with_variant_arg_and_non_root_user() -> None:
    stages = _stages()
    names = [re.search(r"\bAS\s+(\S+)", s[0][1], re.IGNORECASE) for s in stages]
    assert len(stages) >= 2 and all(names), "every stage is named: FROM ... AS <name>"
    final = stages[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime stage must switch to a non-root user"
    args = [rest.split("=")[0] for keyword, rest in _dockerfile() if keyword == "ARG"]
    assert "VARIANT" in args
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"\bcpu\)", text) and re.search(r"\bcuda\)", text), "VARIANT selects cpu and cuda torch wheels"
    runs = " ".join(rest for keyword, rest in _dockerfile() if keyword == "RUN")
    assert "pip install ." in runs


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    stage_names = []
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in _stages():
        stage_names.append(re.search(r"\bAS\s+(\S+)", stage[0][1], re.IGNORECASE).group(1))
        for keyword, rest in stage:
            if keyword not in ("COPY", "ADD"):
                continue
            parts = shlex.split(rest)
            flags = [p for p in parts if p.startswith("--")]
            sources = [p for p in parts if not p.startswith("--")][:-1]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                assert source_stage in stage_names[:-1], f"COPY --from={source_stage}: no earlier stage of that name"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
                allowed = f"!{source.rstrip('/')}" + ("/**" if (ROOT / source).is_dir() else "")
                assert allowed in ignore, f"{source} is excluded by deploy/Dockerfile.dockerignore"
    assert ignore[0] == "**", "the build context starts empty: data, runs and weights can never reach the image"
    for pattern in ("**/*.pt", "**/*.safetensors", "**/*.pem", "**/*.key"):
        assert pattern in ignore


def test_dockerfile_torch_versions_lie_inside_pyproject_ranges() -> None:
    """The image pins the torch/torchvision pair verified together; pyproject only bounds them (pip pairs them)."""
    from packaging.requirements import Requirement

    deps = {Requirement(d).name: Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["project"]["dependencies"]}
    text = (DEPLOY / "Dockerfile").read_text()
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        found = re.search(rf"^ARG {arg}=(\S+)$", text, re.MULTILINE)
        assert found, f"the Dockerfile must pin {name} with ARG {arg}"
        assert deps[name].specifier.contains(found.group(1)), f"{name} {found.group(1)} outside {deps[name]}"
        assert f"{name}==${{{arg}}}" in text


def test_dockerfile_entrypoint_is_the_fedfusion_command_and_exposes_the_superlink_port() -> None:
    final = dict(_stages()[-1])
    entrypoint = _json_list(final["ENTRYPOINT"])
    assert entrypoint[-1] == "fedfusion"
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(_json_list(final["CMD"]))
    assert exit_info.value.code == 0
    assert final["EXPOSE"].split() == [str(_coordinator_default_port())]


# --- compose ---------------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _expand(text: str) -> str:
    """Compose's ${VAR:-default} with no variables set: the default."""
    return _ENV.sub(lambda m: m.group(2) or "", text)


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's short-syntax volumes."""
    out = []
    for entry in service.get("volumes", []):
        parts = _expand(entry).split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _is_named(source: str) -> bool:
    return not source.startswith(("/", ".", "~"))


def _sites(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if name.startswith("site-")}


def test_compose_commands_are_real_fedfusion_commands() -> None:
    compose = _compose()
    coordinator = compose["services"]["coordinator"]
    args = _expect([str(a) for a in coordinator["command"]], "coordinator start")
    assert args.host == "0.0.0.0" and not args.insecure
    sites = _sites(compose)
    assert len(sites) >= 3
    for service in sites.values():
        assert [str(a) for a in service["command"]] == ["site", "start", "/kit/site.toml"]
        _expect(service["command"], "site start")


def test_compose_volumes_are_declared_and_each_site_has_its_own_ledger() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for source, _target, _ro in _mounts(service):
            if _is_named(source):
                assert source in declared, f"{name} mounts volume {source}, which is not declared"
                used.add(source)
            elif source.startswith("./kits/"):
                assert (DEPLOY / source).is_dir(), f"{name} mounts {source}, missing from deploy/"
    assert used == declared, f"declared but unused volumes: {declared - used}"
    ledgers = []
    for name, service in _sites(compose).items():
        mounts = {target: (source, ro) for source, target, ro in _mounts(service)}
        ledger_source, ledger_ro = mounts[LEDGER_MOUNT]
        assert _is_named(ledger_source) and not ledger_ro, f"{name}: the ledger needs a writable named volume"
        ledgers.append(ledger_source)
        assert mounts["/data"][1] and mounts["/kit"][1], f"{name}: data and kit must be mounted read-only"
        assert "ports" not in service, f"{name}: nothing may listen at a site"
    assert len(set(ledgers)) == len(ledgers), "two sites share a ledger volume"


def test_compose_coordinator_exposes_the_fleet_port_it_serves_on() -> None:
    compose = _compose()
    coordinator = compose["services"]["coordinator"]
    port = _parse([str(a) for a in coordinator["command"]]).port
    published = [str(p).split(":")[-1] for p in coordinator["ports"]]
    assert str(port) in published
    assert any(target == LEDGER_MOUNT and _is_named(source) for source, target, _ in _mounts(coordinator))
    build = coordinator["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file()
    assert "VARIANT" in build["args"]


def test_compose_site_kits_agree_with_the_mounts() -> None:
    compose = _compose()
    coordinator_port = _parse([str(a) for a in compose["services"]["coordinator"]["command"]]).port
    ids = []
    for name, service in _sites(compose).items():
        kit = next(DEPLOY / s for s, t, _ in _mounts(service) if t == "/kit")
        cfg = SiteConfig.load(kit / "site.toml")
        ids.append(cfg.site_id)
        assert cfg.address == f"coordinator:{coordinator_port}"
        assert not cfg.insecure and PurePosixPath(cfg.root_certificates).parent == PurePosixPath("/kit")
        assert PurePosixPath(cfg.manifest).is_relative_to("/data")
        audit = PurePosixPath(audit_path_for(kit / "site.toml"))
        assert audit.is_relative_to(LEDGER_MOUNT), f"{name}: the audit log must be on the ledger volume"
        ledger = PurePosixPath(cfg.privacy.ledger)
        assert ledger.is_relative_to(LEDGER_MOUNT), f"{name}: the privacy ledger must be on the ledger volume"
    assert len(set(ids)) == len(ids), "site ids must be unique"


def test_compose_site_kits_are_safe_by_default() -> None:
    """The shipped site.toml files refuse every bundle until a hash is pasted, never send an update
    unmasked, cap ε per study and over all studies, and trust the kit's roster (issue 16 item 4)."""
    for name, service in _sites(_compose()).items():
        kit = next(DEPLOY / s for s, t, _ in _mounts(service) if t == "/kit")
        cfg = SiteConfig.load(kit / "site.toml")
        assert cfg.approved_apps == frozenset(), f"{name}: [approval] apps = [] (refuse all) until the hash is set"
        assert cfg.require_secure_aggregation, name
        assert cfg.privacy.required and cfg.privacy.max_epsilon_all_studies == cfg.privacy.max_epsilon == 3.0, name
        raw = tomllib.loads((kit / "site.toml").read_text())
        assert raw["privacy"]["max-epsilon-all-studies"] == 3.0, f"{name}: the all-studies cap is written explicitly"
        assert PurePosixPath(raw["federation"]["roster"]) == PurePosixPath("/kit/roster.json"), name


# --- Helm ------------------------------------------------------------------------------------------------


def _templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir()) if p.is_file()}


def test_chart_and_values_parse() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "fedfusion" and chart["version"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {"image", "coordinator", "site"} <= values.keys()


def test_every_values_reference_exists_in_values_yaml() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for name, text in _templates().items():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            node: Any = values
            for key in match.group(1).strip(".").split("."):
                assert isinstance(node, dict) and key in node, f"{name}: .Values{match.group(1)} not in values.yaml"
                node = node[key]


def test_templates_are_balanced_and_includes_are_defined() -> None:
    templates = _templates()
    defined = set(re.findall(r'define\s+"([^"]+)"', "".join(templates.values())))
    for name, text in templates.items():
        assert text.count("{{") == text.count("}}"), f"{name}: unbalanced braces"
        opened = len(re.findall(r"\{\{-?\s*(?:if|range|with|define)\b", text))
        closed = len(re.findall(r"\{\{-?\s*end\b", text))
        assert opened == closed, f"{name}: {opened} blocks opened, {closed} closed"
        for included in re.findall(r'include\s+"([^"]+)"', text):
            assert included in defined, f"{name}: include {included!r} is never defined"


def _args_block(text: str) -> list[str]:
    """The container's ``args:`` list items, template expressions replaced by a placeholder number."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "args:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    items = []
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped.startswith("{{"):
            continue  # control structure: both branches are listed, argparse accepts the union
        if len(line) - len(line.lstrip()) != indent or not stripped.startswith("- "):
            break
        item = stripped[2:].strip()
        items.append("9092" if item.startswith("{{") else item)
    return items


def test_helm_commands_are_real_fedfusion_commands() -> None:
    templates = _templates()
    coordinator = _args_block(templates["coordinator-deployment.yaml"])
    _expect(coordinator, "coordinator start")
    flags = {a for a in coordinator if a.startswith("--")}
    assert flags <= _options(["coordinator", "start"])
    assert _args_block(templates["site-deployment.yaml"]) == ["site", "start", "/kit/site.toml"]


def test_helm_site_mounts_kit_secret_data_and_ledger() -> None:
    templates = _templates()
    site = templates["site-deployment.yaml"]
    for mount, read_only in (("/kit", True), ("/data", True), (LEDGER_MOUNT, False)):
        block = re.search(rf"mountPath: {re.escape(mount)}\n(\s+readOnly: true)?", site)
        assert block is not None and bool(block.group(1)) == read_only, f"site mount {mount}"
    assert "kind: Secret" in templates["site-secret.yaml"]
    assert "site-ledger" in templates["site-pvc.yaml"] and "site-data" in templates["site-pvc.yaml"]
    assert "kind: PersistentVolumeClaim" in templates["coordinator-pvc.yaml"]
    assert "kind: Service" in templates["coordinator-service.yaml"]
    assert not any("kind: Service" in t and "component: site" in t for t in templates.values()), (
        "nothing may listen at a site"
    )


def test_helm_runs_as_the_image_user() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = re.search(r"useradd [^;]*--uid (\d+)", (DEPLOY / "Dockerfile").read_text()).group(1)
    security = values["podSecurityContext"]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == uid
    assert values["coordinator"]["port"] == _coordinator_default_port()


# --- systemd ---------------------------------------------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / name).read_text())
    return parser


@pytest.mark.parametrize(
    ("unit", "command"),
    [("fedfusion-site.service", "site start"), ("fedfusion-coordinator.service", "coordinator start")],
)
def test_systemd_unit_is_hardened_and_runs_a_real_command(unit: str, command: str) -> None:
    parsed = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(parsed.sections())
    service = parsed["Service"]
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert service["User"] not in ("root", "0") and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    writable = service["ReadWritePaths"].split()
    for key in ("StateDirectory", "LogsDirectory"):
        assert f"/var/{'lib' if key == 'StateDirectory' else 'log'}/{service[key]}" in writable
    argv = shlex.split(service["ExecStart"])
    assert PurePosixPath(argv[0]).name == "fedfusion" and PurePosixPath(argv[0]).is_absolute()
    args = _expect(argv[1:], command)
    if command == "site start":
        assert args.config == "/etc/fedfusion/site.toml"
    else:
        assert any(PurePosixPath(args.state_dir).is_relative_to(p) for p in writable), "state dir must be writable"
        assert args.port == _coordinator_default_port() and not args.insecure


# --- docs: every fedfusion command they show is real -----------------------------------------------------

DOCS = [
    ROOT / "docs" / "hospital-it.md",
    ROOT / "docs" / "coordinator.md",
    DEPLOY / "README.md",
    DEPLOY / "kits" / "README.md",
]


def _doc_commands(path: Path) -> list[list[str]]:
    """``fedfusion ...`` invocations in a document's code blocks, also inside ``docker compose exec``,
    ``kubectl exec`` or ``sudo -u``: a word ``fedfusion`` (or ``.../bin/fedfusion``) followed by a
    sub-command-like word."""
    commands, block = [], False
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if line.lstrip().startswith("```"):
            block = not block
            continue
        if not block:
            continue
        while line.rstrip().endswith("\\"):
            line = line.rstrip()[:-1] + " " + next(lines).strip()
        for segment in re.split(r"\s(?:&&|\|\||;|\|)\s", line.split(" #", 1)[0]):
            words = shlex.split(segment, comments=True)
            for i, word in enumerate(words[:-1]):
                if (word == "fedfusion" or word.endswith("/bin/fedfusion")) and re.fullmatch(
                    r"[a-z][a-z-]*|--help", words[i + 1]
                ):
                    commands.append(words[i + 1 :])
                    break
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_show_only_real_commands(doc: Path) -> None:
    assert doc.is_file(), f"{doc} is missing"
    for argv in _doc_commands(doc):
        if argv and argv[-1] == "--help":
            argv = argv[:-1]
            _subparser(argv)  # the command group exists
            continue
        _parse(argv)


def test_site_toml_examples_in_the_it_guide_load(tmp_path: Path) -> None:
    """The guide's ``toml`` blocks are real configs: SiteConfig (and its [privacy] parser) accepts them."""
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "hospital-it.md").read_text(), re.DOTALL)
    site_block = next(b for b in blocks if "[site]" in b)
    privacy_block = next(b for b in blocks if b.lstrip().startswith("[privacy]"))
    path = tmp_path / "site.toml"
    path.write_text(site_block + "\n" + privacy_block)
    cfg = SiteConfig.load(path)
    assert cfg.privacy.required and PurePosixPath(cfg.privacy.ledger).is_relative_to(LEDGER_MOUNT)
    assert PurePosixPath(audit_path_for(path)).is_relative_to(LEDGER_MOUNT)

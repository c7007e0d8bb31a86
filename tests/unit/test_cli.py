"""The `fedfusion` command as a user runs it: exit codes, what it prints, errors that name the problem."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedfusion.cli import build_parser, main
from fedfusion.common.config import Schema


def _fedfusion(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfusion.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_help_lists_every_user_story_command() -> None:
    done = _fedfusion("--help")
    assert done.returncode == 0
    for command in ("site", "coordinator", "run", "status", "simulate", "datasets", "train-local", "privacy"):
        assert command in done.stdout


def test_site_check_passes_a_good_site_and_prints_its_summary(site: Path, schema: Schema, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    schema_path = schema.save(tmp_path / "schema.json")
    assert main(["site", "check", str(site / "manifest.csv" if site.is_dir() else site),
                 "--schema", str(schema_path)]) == 0
    out = capsys.readouterr().out
    assert "rows" in out and "modality coverage" in out


def test_site_check_lists_every_error_with_its_line_and_exits_2(site: Path, schema: Schema, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    manifest = site / "manifest.csv" if site.is_dir() else site
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame.loc[1, "age"] = "old"
    frame.loc[3, "grade"] = "G9"
    frame.to_csv(manifest, index=False)
    schema_path = schema.save(tmp_path / "schema.json")
    assert main(["site", "check", str(manifest), "--schema", str(schema_path)]) == 2
    out = capsys.readouterr().out
    assert "line 3" in out and "'age'" in out and "'old'" in out
    assert "line 5" in out and "'grade'" in out and "G9" in out


def test_datasets_list_names_the_shipped_real_data() -> None:
    done = _fedfusion("datasets", "list")
    assert done.returncode == 0, done.stderr
    for name in ("ovarian", "wdbc-multimodal", "breast-cohorts", "lung"):
        assert name in done.stdout


def test_unknown_partition_is_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["simulate", "--partition", "by-magic"])
    assert caught.value.code == 2


def test_train_local_on_a_generated_site_writes_metrics(site: Path, schema: Schema, tmp_path: Path) -> None:
    manifest = site / "manifest.csv" if site.is_dir() else site
    schema_path = schema.save(tmp_path / "schema.json")
    out = tmp_path / "out"
    assert main(["train-local", "--manifest", str(manifest), "--schema", str(schema_path), "--epochs", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert any(key in json.dumps(metrics) for key in ("auc", "c_index"))


def test_simulate_scale_options_reach_the_run_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--scale-sites/--rows-per-site/--fraction-*/--ray-address: parsed into the spec, then into the
    run config Flower's runtime gets (min-sites no larger than one sample, or Flower would wait)."""
    import fedfusion.simulations.simulate as simulate_module
    from fedfusion.simulations.simulate import run_config_for

    seen = {}

    def fake_simulate(spec, on_round=None, on_step=None):  # the parsing is under test, not the 10,000-site run
        seen["spec"] = spec
        report = tmp_path / "report.md"
        report.write_text("# report\n")
        return report

    monkeypatch.setattr(simulate_module, "simulate", fake_simulate)
    code = main(["simulate", "--dataset", "wdbc-multimodal", "--scale-sites", "10000", "--rows-per-site", "20",
                 "--fraction-train", "0.01", "--fraction-evaluate", "0.02", "--ray-address", "10.0.0.5:6379",
                 "--rounds", "2", "--out", str(tmp_path / "run")])
    assert code == 0
    spec = seen["spec"]
    assert (spec.scale_sites, spec.rows_per_site, spec.fraction_train, spec.fraction_evaluate, spec.ray_address) == (
        10000, 20, 0.01, 0.02, "10.0.0.5:6379")
    config = run_config_for(spec, tmp_path / "schema.json", {})
    assert (config["scale-sites"], config["scale-rows-per-site"], config["min-sites"]) == (10000, 20, 100)
    assert (config["fraction-train"], config["fraction-evaluate"], config["num-server-rounds"]) == (0.01, 0.02, 2)


@pytest.mark.parametrize("command", [["status"], ["coordinator", "sites"], ["coordinator", "stop", "3"],
                                     ["run", "--schema", "schema.json"]])
def test_coordinator_commands_without_a_coordinator_write_nothing_and_say_so(tmp_path: Path,
                                                                             command: list[str]) -> None:
    done = _fedfusion(*command, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.strip() == ("error: no coordinator state in ./coordinator: start one with "
                                   "`fedfusion coordinator start` (or pass the --state-dir it used)")
    assert "Traceback" not in done.stderr and "╭" not in done.stdout + done.stderr  # no Flower error box
    assert list(tmp_path.iterdir()) == []  # flwr would have created coordinator/flwr/config.toml


@pytest.mark.parametrize(("argv", "needles"), [
    (["simulate", "--dataset", "ovarain"], ["--dataset 'ovarain'", "did you mean 'ovarian'?", "wdbc-multimodal"]),
    (["simulate", "--fusion", "attn"], ["--fusion 'attn'", "did you mean 'attention'?", "kronecker"]),
    (["run", "--schema", "s.json", "--fusion", "atention"], ["did you mean 'attention'?"]),
    (["train-local", "--manifest", "m.csv", "--schema", "s.json", "--backbone", "resnet81"],
     ["--backbone 'resnet81'", "did you mean 'resnet18'?", "cnn_small", "timm:<any timm model>"]),
    (["simulate", "--strategy", "fedavgg"], ["--strategy 'fedavgg'", "did you mean 'fedavg'?", "fedprox"]),
    (["run", "--schema", "s.json", "--strategy", "fedadm"], ["did you mean 'fedadam'?"]),
    (["simulate", "--partition", "dirichlett"], ["--partition 'dirichlett'", "did you mean 'dirichlet'?",
                                                 "modality-missing"]),
    (["datasets", "build", "lugn", "out"], ["'lugn'", "did you mean 'lung'?"]),
    (["simulate", "--dataset", "exports/hospitals"], ["not a path", "--sites-dir exports/hospitals"]),
])
def test_a_mistyped_name_is_one_line_with_the_choices_and_exit_2(argv: list[str], needles: list[str],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("fedfusion"), err
    assert all(needle in err for needle in needles), err


def test_help_shows_defaults() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["simulate"].format_help()  # type: ignore[union-attr]
    text = " ".join(help_text.split())  # argparse wraps lines at the terminal width
    assert "(default: ovarian)" in text and "(default: natural)" in text and "(default: 5)" in text


@pytest.mark.parametrize(("ended_early", "expected"),
                         [("", 0), ("round 2: every site that answered refused to train", 1)])
def test_simulate_exits_non_zero_when_the_federated_run_ended_early(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        ended_early: str, expected: int) -> None:
    """A report with fewer rounds than asked is not the job that was asked: exit 1 with one line why."""
    import json

    import fedfusion.simulations.simulate as simulate_module

    def fake_simulate(spec, on_round=None, on_step=None):  # the exit mapping is under test, not training
        (spec.out_dir / "federated").mkdir(parents=True)
        (spec.out_dir / "federated" / "summary.json").write_text(json.dumps({"ended_early": ended_early}))
        report = spec.out_dir / "report.md"
        report.write_text("# report\n")
        return report

    monkeypatch.setattr(simulate_module, "simulate", fake_simulate)
    code = main(["simulate", "--dataset", "ovarian", "--rounds", "3", "--out", str(tmp_path / "run")])
    assert code == expected
    err = capsys.readouterr().err
    assert ("ended early" in err) == bool(ended_early)


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf sub-command's parser by its command line ("site check", "simulate", ...)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found |= _subparsers(child, f"{prefix} {name}".strip())
    return found or {prefix: parser}


def test_every_option_of_every_sub_command_shows_its_default_in_help() -> None:
    from fedfusion.cli_choices import DefaultsFormatter

    commands = _subparsers(build_parser())
    assert {"site check", "simulate", "explain", "train-local", "coordinator start", "datasets list"} <= set(commands)
    missing = []
    for command, parser in commands.items():
        formatter = DefaultsFormatter(prog=command)
        for action in parser._actions:
            no_default = action.default in (None, False, argparse.SUPPRESS)
            if not action.option_strings or no_default or action.help == argparse.SUPPRESS:
                continue
            text = formatter._get_help_string(action) or ""
            if "default" not in text:
                missing.append(f"{command} {action.option_strings[0]}")
    assert not missing, missing


@pytest.mark.parametrize(("command", "flags"), [(["simulate"], ["--dataset", "--fusion", "--strategy"]),
                                                (["train-local"], ["--fusion", "--backbone"]),
                                                (["run"], ["--fusion", "--strategy"])])
def test_help_lists_the_choices_of_registry_options(command: list[str], flags: list[str]) -> None:
    from fedfusion.common.models import list_fusions, list_image_backbones
    from fedfusion.simulations.datasets import list_datasets

    parser = _subparsers(build_parser())[" ".join(command)]
    text = " ".join(parser.format_help().split())
    expected = {"--dataset": [info.name for info in list_datasets()], "--fusion": list(list_fusions()),
                "--backbone": [*list_image_backbones(), "timm:<any timm model>"],
                "--strategy": ["fedavg", "fedprox", "fedadam"]}
    for flag in flags:
        options = text.split("options:", 1)[1]  # past the usage line
        listed = options.split(f"{flag} ", 1)[1].split(" --", 1)[0]  # this option's help, up to the next option
        for name in expected[flag]:
            assert name in listed.replace("- ", "-"), (flag, name, listed)  # argparse may break a line after "-"


def test_device_defaults_to_auto_in_every_training_command() -> None:
    """One meaning everywhere: CUDA when available, else CPU (common/training.py pick_device). explain used to
    default to cpu and crash on "auto" (torch.device("auto")); tests/unit/simulations/test_explain.py's CLI
    test now runs with the default."""
    parser = build_parser()
    for argv in (["simulate"], ["explain", "runs/demo"], ["train-local", "--manifest", "m.csv", "--schema", "s.json"]):
        assert parser.parse_args(argv).device == "auto", argv


def test_version_names_fedfusion_flower_torch_and_python_without_importing_them() -> None:
    import importlib.metadata as md
    import platform

    probe = ("import sys\nfrom fedfusion.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint(code, sorted(m for m in ('torch', 'flwr', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line, exit_line = done.stdout.strip().splitlines()
    assert line == (f"fedfusion {md.version('fedfusion')} (Flower {md.version('flwr')}, torch {md.version('torch')}, "
                    f"Python {platform.python_version()})")
    assert exit_line == "0 []"  # exit 0, and nothing heavy was imported to answer


def test_datasets_list_shows_each_data_sets_licence(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fedfusion.simulations.datasets import list_datasets

    monkeypatch.setenv("COLUMNS", "400")  # one line per row: rich folds cells at the terminal width
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert "licence" in out
    for info in list_datasets():
        row = next(line for line in out.splitlines() if f" {info.name} " in line)
        assert info.licence in row, (info.name, row)


def test_simulate_with_a_split_the_data_set_cannot_take_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """wdbc has no natural sites: the default --partition natural must say so, not print a traceback."""
    out = tmp_path / "run"
    assert main(["simulate", "--dataset", "wdbc-multimodal", "--rounds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data set 'wdbc-multimodal' has no natural site column")
    assert "--partition" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / "model.pt").exists()

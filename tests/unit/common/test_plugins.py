"""Plug-ins through entry points (common/plugins.py): real distributions (a dist-info folder with
entry_points.txt) on sys.path, found by importlib.metadata exactly as an installed package is.

Each test works on copies of the registries, so what a fake plug-in registers disappears afterwards.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from fedfusion.common import plugins
from fedfusion.common.config import ClinicalColumn, ConfigError, ModelConfig, Schema, load_schema
from fedfusion.common.models import create_model, list_fusions, list_image_backbones, register_image_backbone, registry
from fedfusion.simulations import datasets
from fedfusion.simulations.datasets import (
    DatasetError,
    DatasetInfo,
    build_dataset,
    dataset_names,
    register_dataset,
)

TINY_BACKBONE = """
    import torch
    from torch import nn
    from fedfusion.common.models import Fusion, FusionOutput, register_fusion, register_image_backbone

    class Net(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.plugin_conv = nn.Conv2d(channels, 4, 3, padding=1)
            self.plugin_norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return torch.relu(self.plugin_norm(self.plugin_conv(x))).mean(dim=(2, 3))

    @register_image_backbone("fake_cnn")
    def fake_cnn(image, pretrained_path=None):
        return Net(image.channels)

    @register_fusion("fake_sum")
    class SumFusion(Fusion):
        def __init__(self, dims, cfg):
            super().__init__(dims, cfg)
            self.out_dim = next(iter(dims.values()))

        def forward(self, embeddings, mask):
            return FusionOutput(torch.stack(embeddings, dim=1).sum(dim=1))
"""


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of every registry and a fresh plug-in cache, restored after the test."""
    list_fusions()  # announce the model registries (their built-in names are the baseline)
    for table in ("_FUSIONS", "_IMAGE_BACKBONES", "_HEADS"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    monkeypatch.setattr(registry, "_VOLUMETRIC", set(registry._VOLUMETRIC))
    monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))
    monkeypatch.setattr(datasets, "_BUILDERS", dict(datasets._BUILDERS))
    monkeypatch.setattr(plugins, "_LOADED", {})


def install(root: Path, monkeypatch: pytest.MonkeyPatch, dist: str, modules: dict[str, str],
            entry_points: dict[str, dict[str, str]]) -> None:
    """A distribution as pip leaves it (modules + NAME-VERSION.dist-info with METADATA and entry points)."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
        for group, points in entry_points.items()))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.setitem(sys.modules, module, None)  # recorded as absent: removed again after the test
        del sys.modules[module]
    monkeypatch.syspath_prepend(str(root))


def test_model_plugin_is_loaded_lazily_by_create_model_and_reports_what_it_registered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None, schema: Schema) -> None:
    install(tmp_path, monkeypatch, "fake-plugin", {"fake_plugin_models": TINY_BACKBONE},
            {plugins.MODELS_GROUP: {"fake": "fake_plugin_models"}})

    model = create_model(schema, ModelConfig(fusion="fake_sum", image_backbone="fake_cnn"))  # no explicit load

    names = set(model.state_dict())
    assert {"encoders.image.backbone.plugin_conv.weight", "encoders.image.backbone.plugin_norm.bias"} <= names
    assert "fake_cnn" in list_image_backbones() and "fake_sum" in list_fusions()
    (plugin,) = plugins.load_plugins(plugins.MODELS_GROUP)
    assert (plugin.name, plugin.value, plugin.distribution) == ("fake", "fake_plugin_models", "fake-plugin 0.1")
    assert plugin.ok and plugin.registered == {"fusion": ("fake_sum",), "image backbone": ("fake_cnn",)}
    assert plugins.load_plugins(plugins.MODELS_GROUP) == [plugin]  # once per process: a cached answer


def test_plugin_reusing_a_builtin_name_is_refused_with_one_line_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None) -> None:
    source = "from fedfusion.common.models import register_image_backbone\n" \
             "register_image_backbone('cnn_small')(lambda image, pretrained_path=None: None)\n"
    install(tmp_path, monkeypatch, "squatter", {"squatter_mod": source}, {plugins.MODELS_GROUP: {"sq": "squatter_mod"}})

    (plugin,) = plugins.load_plugins(plugins.MODELS_GROUP)

    assert plugin.error == ("plug-in 'sq' (fedfusion.models entry point 'squatter_mod' from squatter 0.1) failed to "
                            "load: ValueError: image backbone 'cnn_small' is already registered (by "
                            "fedfusion.common.models.encoders.image)")
    assert registry.get_image_backbone("cnn_small").__module__ == "fedfusion.common.models.encoders.image"
    with pytest.raises(ValueError, match="fusion 'attention' is already registered"):
        registry.register_fusion("attention")(type("Other", (), {}))
    with pytest.raises(ValueError, match="backbone names may not start with 'timm:'"):
        register_image_backbone("timm:mine")


def test_broken_plugin_leaves_other_names_working_and_is_named_where_a_name_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None, schema: Schema) -> None:
    install(tmp_path, monkeypatch, "broken-plugin", {"broken_mod": "import missing_dependency_xyz\n"},
            {plugins.MODELS_GROUP: {"broken": "broken_mod"}})
    expected = ("plug-in 'broken' (fedfusion.models entry point 'broken_mod' from broken-plugin 0.1) failed to load: "
                "ModuleNotFoundError: No module named 'missing_dependency_xyz'")

    assert "attention" in list_fusions()  # unrelated names still resolve
    model = create_model(schema, ModelConfig(fusion="concat"))
    assert sum(p.numel() for p in model.parameters()) > 0

    assert plugins.failures(plugins.MODELS_GROUP) == [expected]
    with pytest.raises(ConfigError) as missing:
        create_model(schema, ModelConfig(image_backbone="broken_cnn"))
    assert expected in str(missing.value) and "\n" not in str(missing.value)
    with pytest.raises(ValueError) as unknown_fusion:
        registry.get_fusion("broken_fusion")
    assert str(unknown_fusion.value).endswith(f"; note: {expected}")

    from fedfusion.cli import build_parser
    from fedfusion.cli_choices import check_choices

    args = build_parser().parse_args(["simulate", "--dataset", "lung", "--backbone", "broken_cnn"])
    problem = check_choices(args)
    assert problem is not None and problem.startswith("--backbone 'broken_cnn' is not a valid choice")
    assert problem.endswith(expected)


TOY_DATA = """
    import pandas as pd
    from fedfusion.common.config import ClinicalColumn, Schema
    from fedfusion.simulations.datasets import BuiltDataset, DatasetInfo, register_dataset

    def build():
        frame = pd.DataFrame({"case_id": [f"c{i:02d}" for i in range(30)],
                              "label": ["no", "yes"] * 15, "score": [float(i) for i in range(30)]})
        schema = Schema(name="toy-plugin-data", task="classification", classes=("no", "yes"),
                        clinical=(ClinicalColumn("score", "numeric"),))
        return BuiltDataset(frame, schema)

    register_dataset(DatasetInfo(name="toy-plugin-data", description="30 synthetic rows", task="classification",
                                 source="test", licence="CC0", natural_site=None, needs_extra=False), build)
"""
TOY_INFO = DatasetInfo(name="toy", description="30 synthetic rows", task="classification", source="test",
                       licence="CC0", natural_site=None, needs_extra=False)


def _toy_builder(name: str):
    def build() -> datasets.BuiltDataset:
        frame = pd.DataFrame({"case_id": ["a", "b", "c"], "label": ["no", "yes", "no"], "x": [1.0, 2.0, 3.0]})
        return datasets.BuiltDataset(frame, Schema(name=name, task="classification", classes=("no", "yes"),
                                                   clinical=(ClinicalColumn("x", "numeric"),)))

    return build


def test_dataset_plugin_registers_a_data_set_every_entry_point_can_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None) -> None:
    install(tmp_path / "site-packages", monkeypatch, "toy-data", {"toy_data_mod": TOY_DATA},
            {plugins.DATASETS_GROUP: {"toy": "toy_data_mod"}})

    schema_path = build_dataset("toy-plugin-data", tmp_path / "out", seed=3)  # no explicit load

    manifest = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "case_id,split,label,score" and len(manifest) == 31
    assert sorted(line.split(",")[1] for line in manifest[1:]).count("test") == 6  # 20 % of 30
    assert load_schema(schema_path).name == "toy-plugin-data"
    assert dataset_names()[-1] == "toy-plugin-data"
    (plugin,) = plugins.load_plugins(plugins.DATASETS_GROUP)
    assert plugin.registered == {"data set": ("toy-plugin-data",)}


def test_register_dataset_refuses_a_taken_name_and_a_builder_that_breaks_the_contract(registries: None) -> None:
    builder = _toy_builder("toy")
    register_dataset(TOY_INFO, builder)
    register_dataset(TOY_INFO, builder)  # the same registration again: a no-op
    with pytest.raises(ValueError, match=r"^data set 'toy' is already registered \(by tests\."):
        register_dataset(TOY_INFO, _toy_builder("toy"))
    with pytest.raises(ValueError, match="data set 'lung' is already registered"):
        register_dataset(DatasetInfo(**{**TOY_INFO.__dict__, "name": "lung"}), builder)

    register_dataset(DatasetInfo(**{**TOY_INFO.__dict__, "name": "misnamed"}), _toy_builder("other"))
    with pytest.raises(DatasetError, match="data set 'misnamed': its builder returned schema 'other'"):
        datasets.source_table("misnamed")
    with pytest.raises(DatasetError, match=r"^unknown data set 'nope'; available: ovarian, .*, toy, misnamed$"):
        datasets.source_table("nope")


def test_fedfusion_plugins_lists_each_plugin_and_warns_once_about_a_broken_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None, capsys: pytest.CaptureFixture) -> None:
    install(tmp_path, monkeypatch, "fake-plugin", {"fake_plugin_models2": TINY_BACKBONE, "broken_mod2": "1/0\n"},
            {plugins.MODELS_GROUP: {"fake": "fake_plugin_models2", "zz_broken": "broken_mod2"}})
    from fedfusion.cli import main

    code = main(["plugins"])

    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines() == [
        "fedfusion.models: fake = fake_plugin_models2 (fake-plugin 0.1)",
        "  fusion: fake_sum",
        "  image backbone: fake_cnn",
        "fedfusion.models: zz_broken = broken_mod2 (fake-plugin 0.1)",
        "  FAILED to load (see the warning)",
    ]
    assert err == ("warning: plug-in 'zz_broken' (fedfusion.models entry point 'broken_mod2' from fake-plugin 0.1) "
                   "failed to load: ZeroDivisionError: division by zero\n")

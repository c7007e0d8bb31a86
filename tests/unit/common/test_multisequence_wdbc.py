"""A real multi-sequence demo end to end: WDBC (scikit-learn's shipped breast cancer data) as two
image "sequences" per patient, rendered from that patient's own measurements.

WDBC holds each patient's nuclear morphometry twice: the "mean" and the "worst" (largest) value of
ten measurements. ``simulations/rendering.py`` draws a nucleus from such a set, so every patient gets
a ``mean`` and a ``worst`` image: two views of one case, with real labels (rendered, not photographed).
Some cases lack one view (blank manifest cell). The test goes manifest -> dataset -> multi-sequence
model (separate and shared encoders) -> training -> held-out AUC, which must be far above chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from fedfusion.common.config import ModelConfig, Schema, TrainConfig
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import load_manifest
from fedfusion.common.models import create_model
from fedfusion.common.training import LossFunction, fit, make_loader, metrics_from, pick_device, predict
from fedfusion.simulations.rendering import Morphometry, nucleus_rng, render_nucleus, save_png

SIZE = 32
N_CASES = 160
VIEWS = ("mean", "worst")


def _morphometry(row: dict[str, float], view: str) -> Morphometry:
    return Morphometry.from_mapping({k.replace(f"{view} ", "mean ", 1): v for k, v in row.items()
                                     if k.startswith(f"{view} ")})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Schema]:
    data = load_breast_cancer(as_frame=True)
    frame, target = data.frame, data.target.to_numpy()
    rng = np.random.default_rng(0)
    picked = np.concatenate([rng.choice(np.flatnonzero(target == c), N_CASES // 2, replace=False) for c in (0, 1)])
    rng.shuffle(picked)
    root = tmp_path_factory.mktemp("wdbc_views")
    lines = ["case_id,label,split,image_mean,image_worst"]
    for i, index in enumerate(picked):
        row = frame.iloc[index].to_dict()
        paths = {}
        for v, view in enumerate(VIEWS):
            # every 7th case lacks the mean view, every 11th the worst one (never both)
            if (view == "mean" and i % 7 == 3) or (view == "worst" and i % 11 == 5 and i % 7 != 3):
                paths[view] = ""
                continue
            (root / view).mkdir(exist_ok=True)
            image = render_nucleus(_morphometry(row, view), nucleus_rng(int(index), seed=v), size=SIZE)
            paths[view] = save_png(image, root / view / f"c{index}.png").relative_to(root).as_posix()
        split = "test" if i % 4 == 0 else "train"
        lines.append(f"W{index},{data.target_names[target[index]]},{split},{paths['mean']},{paths['worst']}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    schema = Schema.from_dict({"name": "wdbc-views", "task": "classification",
                               "classes": list(data.target_names),
                               "images": [{"name": view, "size": [SIZE, SIZE]} for view in VIEWS]})
    return root / "manifest.csv", schema


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("image_encoders", ["separate", "shared"])
def test_two_view_model_learns_malignancy_from_real_measurements(site, image_encoders: str) -> None:
    path, schema = site
    manifest = load_manifest(path, schema)
    coverage = manifest.summary()["modality_coverage"]
    assert coverage["image:mean"] < 1.0 and coverage["image:worst"] < 1.0  # missing views are real here
    pre = Preprocessor.fit(manifest)
    train = MultimodalDataset(manifest, pre, "train", train_augment=True)
    test = MultimodalDataset(manifest, pre, "test")
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion="attention", image_encoders=image_encoders, embed_dim=16,
                                             hidden_dim=32))
    cfg = TrainConfig(epochs=8, batch_size=16, lr=3e-3, device="cpu", seed=0)
    loss_fn = LossFunction(schema)
    fit(model, make_loader(train, cfg.batch_size, shuffle=True), None, cfg, loss_fn)
    pred = predict(model, make_loader(test, 64, shuffle=False), loss_fn, pick_device("cpu"))
    metrics = metrics_from(pred)
    assert metrics["auc"] > 0.8, metrics  # measured 0.86 (separate) and 0.93 (shared); shuffled labels 0.34 and 0.62
    # attention never weighs a missing view
    mask = test._tabular["mask"].numpy()
    assert (~mask).any() and np.all(pred.modality_weights[~mask] == 0.0)

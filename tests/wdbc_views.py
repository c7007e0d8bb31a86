"""WDBC (scikit-learn's shipped breast cancer data) as a two-sequence imaging study: every patient's
"mean" and "worst" nuclear morphometry rendered as two images (``simulations/rendering.py``), with
real labels. Some cases lack one view (blank manifest cell), and ``sites`` can split the cases into
site manifests, one of which may lack a view's column entirely (a hospital without that sequence).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from fedfusion.common.config import Schema
from fedfusion.simulations.rendering import Morphometry, nucleus_rng, render_nucleus, save_png

VIEWS = ("mean", "worst")


def _morphometry(row: dict[str, float], view: str) -> Morphometry:
    return Morphometry.from_mapping({k.replace(f"{view} ", "mean ", 1): v for k, v in row.items()
                                     if k.startswith(f"{view} ")})


def write_wdbc_views(root: Path, n_cases: int, size: int, sites: Mapping[str, set[str]] | None = None,
                     seed: int = 0) -> tuple[dict[str, Path], Schema]:
    """Balanced ``n_cases`` patients under ``root``: manifest ``all`` (train/test), or with ``sites``
    (site -> views it lacks) one manifest per site (train/val/test), cases dealt round-robin."""
    data = load_breast_cancer(as_frame=True)
    frame, target = data.frame, data.target.to_numpy()
    rng = np.random.default_rng(seed)
    picked = np.concatenate([rng.choice(np.flatnonzero(target == c), n_cases // 2, replace=False) for c in (0, 1)])
    rng.shuffle(picked)
    names = list(sites) if sites else ["all"]
    lines = {name: ["case_id,label,split,image_mean,image_worst"] for name in names}
    for i, index in enumerate(picked):
        name = names[i % len(names)]
        lacking = (sites or {}).get(name, set())
        row = frame.iloc[index].to_dict()
        paths = {}
        for v, view in enumerate(VIEWS):
            # every 7th case lacks the mean view, every 11th the worst one (never both, never at a site
            # lacking the other view: a case with no data at all is refused by the manifest check)
            lost = (view == "mean" and i % 7 == 3 and "worst" not in lacking) or (
                view == "worst" and i % 11 == 5 and i % 7 != 3)
            if view in lacking or lost:
                paths[view] = ""
                continue
            (root / view).mkdir(exist_ok=True)
            image = render_nucleus(_morphometry(row, view), nucleus_rng(int(index), seed=v), size=size)
            paths[view] = save_png(image, root / view / f"c{index}.png").relative_to(root).as_posix()
        k = i // len(names)
        split = "test" if k % 4 == 0 else ("val" if sites and k % 8 == 1 else "train")
        lines[name].append(f"W{index},{data.target_names[target[index]]},{split},{paths['mean']},{paths['worst']}")
    manifests = {}
    for name, rows in lines.items():
        manifests[name] = root / ("manifest.csv" if name == "all" else f"{name}.csv")
        manifests[name].write_text("\n".join(rows) + "\n")
    schema = Schema.from_dict({"name": "wdbc-views", "task": "classification", "classes": list(data.target_names),
                               "images": [{"name": view, "size": [size, size]} for view in VIEWS]})
    return manifests, schema

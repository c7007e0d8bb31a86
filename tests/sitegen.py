"""Small real-looking site data that tests write themselves (no network, no shipped data set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fedfusion.common.config import ClinicalColumn, Schema

OMICS = tuple(f"gene{i}" for i in range(6))


def make_site(folder: Path, n: int = 40, seed: int = 0, with_images: bool = True) -> Path:
    """Write ``manifest.csv`` + ``images/*.png`` where the label drives a bright blob, age and gene0."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    labels = np.array([i % 2 for i in range(n)])
    rows = []
    for i in range(n):
        y = labels[i]
        image_name = ""
        if with_images:
            pixels = rng.normal(60, 10, (32, 32))
            radius = 5 + 6 * y
            yy, xx = np.mgrid[:32, :32]
            pixels[(yy - 16) ** 2 + (xx - 16) ** 2 < radius**2] += 120
            image_name = f"images/case{i:03d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / image_name)
        rows.append({
            "case_id": f"P{i:03d}",
            "split": "test" if i % 5 == 0 else ("val" if i % 5 == 1 else "train"),
            "label": "malignant" if y else "benign",
            "time": float(rng.uniform(1, 100) * (0.5 if y else 1.0)),
            "event": int(rng.uniform() < 0.6),
            "image": image_name,
            "age": round(float(rng.normal(55 + 10 * y, 5)), 1),
            "size_mm": round(float(rng.normal(20, 4)), 1) if i % 7 else "",
            "grade": ["G1", "G2", "G3"][int(rng.integers(0, 3))] if i % 9 else "",
            **{g: round(float(rng.normal(y if g == "gene0" else 0, 1)), 4) for g in OMICS},
        })
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def survival_schema() -> Schema:
    """A hospital-style survival schema: its own time/event column names, numeric and categorical columns."""
    return Schema(name="my-sites", task="survival", time_column="time_months", event_column="death",
                  clinical=(ClinicalColumn("age"), ClinicalColumn("tumour_size"),
                            ClinicalColumn("stage", kind="categorical", categories=("I", "II", "III"))))


def make_sites_dir(root: Path, sizes: dict[str, int], split_at: tuple[str, ...] = ()) -> Path:
    """``root/schema.json`` + ``root/<site>/manifest.csv`` (id, time, event, 3 clinical columns); the
    survival time shrinks with age so there is something to learn. Sites in ``split_at`` carry a split."""
    root.mkdir(parents=True, exist_ok=True)
    survival_schema().save(root / "schema.json")
    for k, (site, n) in enumerate(sizes.items()):
        rng = np.random.default_rng(k)
        age = rng.normal(60, 10, n)
        frame = pd.DataFrame({
            "case_id": [f"{site}-{i:03d}" for i in range(n)],
            "time_months": np.round(rng.exponential(60 * np.exp(-(age - 60) / 15)) + 0.5, 1),
            "death": (rng.uniform(size=n) < 0.6).astype(int),
            "age": age.round(1),
            "tumour_size": rng.normal(30, 8, n).round(1),
            "stage": rng.choice(["I", "II", "III"], n),
        })
        if site in split_at:
            frame.insert(1, "split", np.where(np.arange(n) % 5 == 0, "test", "train"))
        (root / site).mkdir(parents=True)
        frame.to_csv(root / site / "manifest.csv", index=False)
    return root

"""``fedfusion datasets export NAME --out DIR``: a shipped data set's real sites as hospital-style CSV exports.

What a researcher brings from each hospital is a plain CSV: a patient id, follow-up time and event,
clinical and gene columns -- no ``split``, no ``site``, nothing fedfusion-specific. This writes one such
file per natural site (ovarian's 4 studies, the breast cohorts, lung's institutions) so the "Bring your
own data" path (``site init`` -> ``site check`` -> ``simulate --sites-dir``) can be run and tested on
real data without vendoring it (the source packages are GPL: generated here, never committed).
"""

from __future__ import annotations

import re
from pathlib import Path

from fedfusion.simulations.datasets import DATASETS, DatasetError, source_table


def export_sites(name: str, out_dir: Path) -> dict[str, Path]:
    """Write ``out_dir/<site>.csv`` per natural site; return site -> file."""
    frame, schema, has_files = source_table(name)  # first: it loads data set plug-ins, then DATASETS has them
    info = DATASETS.get(name)
    if info is None or info.site_column is None or "site" not in frame.columns:
        raise DatasetError(f"data set '{name}' has no natural sites to export; choose one of "
                           f"{sorted(n for n, i in DATASETS.items() if i.site_column)}")
    if has_files:
        raise DatasetError(f"data set '{name}' has images or visits, which a one-file CSV export cannot hold")
    time_name = f"time_{info.time_unit}" if info.time_unit else "time"
    # gene columns prefixed as a lab system exports them, so `site init --omics 'gene_*'` can name them
    renamed = frame.rename(columns={"case_id": "patient_id", "time": time_name, "label": "outcome",
                                    **{g: f"gene_{g}" for g in schema.omics}})
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for site, rows in renamed.groupby("site", sort=True):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(site)).strip("-") or "site"
        path = out_dir / f"{slug}.csv"
        rows.drop(columns=["site"]).to_csv(path, index=False, float_format="%.8g")
        written[slug] = path
    return written

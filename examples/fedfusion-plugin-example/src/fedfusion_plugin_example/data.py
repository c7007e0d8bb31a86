"""A data set for fedfusion derived from a shipped one: WDBC with no image, tabular only.

``example-wdbc-tabular`` keeps ``wdbc-multimodal``'s patients, labels and 20 clinical columns and drops
the rendered nucleus image: a quick data set for tabular fusions. The builder only reshapes what
fedfusion's own builder returns, so it reads nothing from the network and follows the builder contract
of :func:`fedfusion.simulations.datasets.register_dataset` (one row per patient, no split column).
"""

from __future__ import annotations

from dataclasses import replace

from fedfusion.simulations.datasets import BuiltDataset, DatasetInfo, register_dataset, source_table

NAME = "example-wdbc-tabular"
INFO = DatasetInfo(
    name=NAME,
    description="569 Wisconsin breast cancer patients (benign/malignant), the 20 'error' and 'worst' "
                "features as clinical columns, no image (example plug-in, derived from wdbc-multimodal). "
                "No real site: any partition is simulated.",
    task="classification",
    source="scikit-learn (load_breast_cancer), via fedfusion's wdbc-multimodal",
    licence="scikit-learn BSD-3; WDBC from the UCI repository (CC BY 4.0)",
    natural_site=None,
    needs_extra=False,
)


def build() -> BuiltDataset:
    frame, schema, _ = source_table("wdbc-multimodal")
    frame = frame.drop(columns=["image"])
    return BuiltDataset(frame, replace(schema, name=NAME, image=None, description=INFO.description))


register_dataset(INFO, build)

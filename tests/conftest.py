"""Fixtures that make small, real-looking site data: a schema with all three modalities and a
manifest folder with PNG images, so tests need no network and no shipped data set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfusion.common.config import ClinicalColumn, ImageSpec, Schema
from tests.sitegen import OMICS, make_site


@pytest.fixture
def schema() -> Schema:
    """A classification + survival federation with image, clinical (2 numeric, 1 categorical) and omics."""
    return Schema(
        name="toy",
        task="both",
        classes=("benign", "malignant"),
        clinical=(
            ClinicalColumn("age"),
            ClinicalColumn("size_mm"),
            ClinicalColumn("grade", kind="categorical", categories=("G1", "G2", "G3")),
        ),
        omics=OMICS,
        image=ImageSpec(size=(32, 32), channels=1),
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path / "site")


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Messages need a run identity, which Flower's runtime sets in a real ServerApp/ClientApp process
    (task 1, run 1, node 0 here; the previous ids are put back after the test). Modules that build Messages
    outside one opt in with ``pytestmark = pytest.mark.usefixtures("flower_task_identity")``."""
    from fedfusion.common.flower_adapter import message_identity

    with message_identity(task_id=1, run_id=1, node_id=0):
        yield


@pytest.fixture
def one_torch_thread():
    """Many tiny ops: one intra-op thread is as fast uncontended and far faster when other jobs share
    the cores (OpenMP workers spin-wait on busy CPUs). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

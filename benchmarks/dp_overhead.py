"""DP-SGD cost: step time and peak memory of a private step relative to a plain step, one run.

What is measured (batch 64 of 64x64 grey images, binary classification, SGD, one optimizer step):

- ``default``: the default fusion model (``ModelConfig()``: attention fusion, ``cnn_small`` image
  encoder) over image + clinical (3 columns) + omics (50 features);
- ``cnn_small``, ``convnext_atto``, ``vit_tiny_patch16_224``: image-only models on each backbone.

Each model runs a plain step, then DP-SGD steps through the site's own wrapping
(``common.privacy.make_private``: Opacus ``PrivacyEngine``, Poisson sampling, flat clipping) in
every requested Opacus mode: ``hooks`` (per-sample gradients from module hooks), ``ghost`` (ghost /
fast gradient clipping: per-sample norms without materialising per-sample gradients, then a second
backward), ``fused`` (``common/dp_fused.py``: per-sample norms and the clipped sum from one
backward, around Opacus' optimizer and accountant) and optionally ``functorch``. Times are medians
over ``--steps`` steps after ``--warmup``,
with the modes' steps interleaved (plain, hooks, ghost, plain, ...) so the ratios hold on a machine
whose load drifts; peak memory is the rise over one step above the memory held before it (CUDA:
allocator statistics; CPU: the process's peak resident set, reset through ``/proc/self/clear_refs``).

    python benchmarks/dp_overhead.py                       # CPU, or CUDA when present
    python benchmarks/dp_overhead.py --device cpu --steps 3 --out docs/results/dp_overhead.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import opacus
import torch
import torch.nn.functional as F

from fedfusion.common.config import ClinicalColumn, ImageSpec, ModelConfig, Schema
from fedfusion.common.models import create_model
from fedfusion.common.privacy import make_private
from fedfusion.common.training import keep_freed_memory_for_reuse, pick_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

MODELS = ("default", "cnn_small", "convnext_atto", "vit_tiny_patch16_224")
Batch = dict[str, torch.Tensor]


def schema_for(model: str) -> Schema:
    """Three modalities for the default model, the image alone for a backbone."""
    image = ImageSpec(size=(64, 64), channels=1)
    if model != "default":
        return Schema(name="bench-image", task="classification", classes=("0", "1"), image=image)
    clinical = (
        ClinicalColumn("age"),
        ClinicalColumn("size_mm"),
        ClinicalColumn("grade", "categorical", ("1", "2", "3")),
    )
    return Schema(
        name="bench",
        task="classification",
        classes=("0", "1"),
        clinical=clinical,
        omics=tuple(f"gene{i}" for i in range(50)),
        image=image,
    )


def random_batch(schema: Schema, size: int, seed: int = 0) -> Batch:
    """A batch following the data loader's contract (see common/data.py), every modality present."""
    g = torch.Generator().manual_seed(seed)
    batch: Batch = {
        "mask": torch.ones(size, len(schema.modalities), dtype=torch.bool),
        "label": torch.randint(0, 2, (size,), generator=g),
    }
    if schema.image is not None:
        batch["image"] = torch.randn(size, 1, *schema.image.size, generator=g)
    if schema.clinical:
        batch["clinical_num"] = torch.randn(size, schema.clinical_width, generator=g)
        batch["clinical_cat"] = torch.randint(0, 4, (size, len(schema.categorical_columns)), generator=g)
    if schema.omics:
        batch["omics"] = torch.randn(size, len(schema.omics), generator=g)
    return batch


class CrossEntropy:
    """The classification loss the sites use (no class weights here)."""

    class_weights = None

    def __call__(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return F.cross_entropy(outputs["logits"], batch["label"])


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


class PeakMemory:
    """Peak memory rise over a block: CUDA allocator statistics, or the CPU process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:  # give freed memory back so that the next block's allocations show in the RSS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux)
        self.base = _status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base


def build(model_name: str, mode: str, device: torch.device, batch_size: int) -> tuple[Callable[[], None], int]:
    """One optimizer step of ``model_name`` in ``mode`` (``plain`` or an Opacus mode), and its parameters."""
    schema = schema_for(model_name)
    backbone = "cnn_small" if model_name == "default" else model_name
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(image_backbone=backbone)).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer: Any = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = {k: v.to(device) for k, v in random_batch(schema, batch_size).items()}
    loss_fn: Callable[..., Any] = CrossEntropy()
    module: torch.nn.Module = model
    if mode != "plain":
        samples = [{k: v[i].cpu() for k, v in batch.items()} for i in range(batch_size)] * 10  # q = 0.1
        private = make_private(
            model,
            samples,
            optimizer,
            loss_fn,
            batch_size=batch_size,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            separable_loss=True,
            device=device,
        )
        if mode != "auto" and private.grad_sample_mode != mode:
            raise RuntimeError(f"Opacus does not support {mode} mode for this model")
        module, optimizer, loss_fn = private.module, private.optimizer, private.loss_fn

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(module(batch), batch).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, params


def measure(
    model_name: str, modes: list[str], device: torch.device, batch_size: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Median step time and peak memory rise of a plain step and each DP mode, for one model.

    Steps of the modes are interleaved (plain, hooks, ghost, plain, ...) so that the ratios hold
    even when other work shares the machine and its load drifts during the run.
    """
    row: dict[str, Any] = {"model": model_name}
    setups: dict[str, Callable[[], None]] = {}
    for mode in ["plain", *modes]:
        try:
            setups[mode], row["params"] = build(model_name, mode, device, batch_size)
        except Exception as err:  # one unsupported mode must not hide the others
            if mode == "plain":
                raise
            row[f"{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    memory = PeakMemory(device)
    peaks: dict[str, int] = {}
    for mode, step in setups.items():
        for _ in range(warmup):
            step()
        memory.start()
        step()
        peaks[mode] = memory.peak()
    times: dict[str, list[float]] = {mode: [] for mode in setups}
    for _ in range(steps):
        for mode, step in setups.items():
            began = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - began)
    plain = statistics.median(times["plain"])
    row.update(plain_ms=1000 * plain, plain_peak_mb=peaks["plain"] / 2**20)
    for mode in modes:
        if mode in setups:
            seconds = statistics.median(times[mode])
            row[f"{mode}_ms"] = 1000 * seconds
            row[f"{mode}_time_ratio"] = seconds / plain
            row[f"{mode}_memory_ratio"] = peaks[mode] / max(peaks["plain"], 1)
    return row


def run(
    device: torch.device, models: list[str], modes: list[str], batch_size: int, steps: int, warmup: int
) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        row = measure(name, modes, device, batch_size, steps, warmup)
        rows.append(row)
        print(_line(row, modes), flush=True)
    return rows


def _line(row: dict[str, Any], modes: list[str]) -> str:
    parts = [f"{row['model']:<22} {row['params'] / 1e6:6.2f}M  plain {row['plain_ms']:8.1f} ms"]
    for mode in modes:
        if f"{mode}_ms" in row:
            parts.append(
                f"{mode} {row[f'{mode}_ms']:8.1f} ms = {row[f'{mode}_time_ratio']:4.2f}x time, "
                f"{row[f'{mode}_memory_ratio']:5.2f}x peak memory"
            )
        else:
            parts.append(f"{mode}: {row.get(f'{mode}_error')}")
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default="hooks,ghost", help="modes: hooks, ghost, functorch, fused, auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", default=None,
                        help="also write the rows and their provenance here")
    args = parser.parse_args()
    keep_freed_memory_for_reuse()  # as every training loop does (common/training.py: train_epochs)
    started = provenance()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(
        f"DP step / plain step, batch {args.batch_size}, 64x64 grey images; device {device} ({where}), "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, opacus {opacus.__version__}"
    )
    modes = [m for m in args.modes.split(",") if m]
    rows = run(device, [m for m in args.models.split(",") if m], modes, args.batch_size, args.steps, args.warmup)
    if args.out:
        payload = {"device": str(device), "where": where, "threads": torch.get_num_threads(),
                   "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rows": rows}
        print(f"wrote {write_json(args.out, payload, started)}")


if __name__ == "__main__":
    main()

"""The packed wire format of model weights: one contiguous Array per aggregation group, not one per tensor.

Why: Flower 1.41 turns every ``Array`` of an ``ArrayRecord`` into its own serialised object (``np.save``
header, protobuf entry, object id and hash in a deployment, ``np.load`` with header parsing at the other
end). A fusion model has ~100 state_dict tensors, so a round paid that per-object cost ~100 times per
message at every site and again at the coordinator. Packed, a message carries one float32 vector per
aggregation group (``group/image``, ``group/clinical``, ``group/shared``...) and one array per other
dtype of a group (``group/shared/int64`` for BatchNorm counters), exact bytes, no conversion.

The layout (which tensor sits where: name, shape, dtype, offset) is never sent: both sides derive it
from the model they build (state_dict names, shapes and dtypes; :func:`group_of_key` over the model's
``parameter_groups()``). What is sent is its SHA-256 (:data:`LAYOUT_KEY`: in the train/evaluate
ConfigRecord from the coordinator, in the reply's ``site`` ConfigRecord from a site); a receiver whose
own layout hashes differently refuses the message (:class:`LayoutMismatch`), because unpacking it would
put one tensor's numbers into another.

Messages without :data:`LAYOUT_KEY` are the per-tensor format (one Array per state_dict key), and a
site answers in the format it was asked in. Secure aggregation's stage one sends the packed global model
*and* the layout's slots (:meth:`PackLayout.to_json`: names, shapes, dtypes; no values), because its
handler must read the global model and the trained update before it masks, without a model of its own;
:meth:`PackLayout.from_json` accepts those slots only when they hash to the sent :data:`LAYOUT_KEY`, the
hash the site's training then checks against its own model.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedfusion.common.config import is_modality

#: ConfigRecord key holding the SHA-256 of the layout a message's arrays are packed with.
LAYOUT_KEY = "layout-sha256"
GROUP_PREFIX = "group/"
SHARED_GROUP = "shared"


def group_of_key(name: str, parameter_groups: Mapping[str, str]) -> str:
    """Group of a state_dict key: a modality name, or ``shared`` (fusion, heads, buffers)."""
    group = parameter_groups.get(name, SHARED_GROUP)
    return group if is_modality(group) else SHARED_GROUP


def name_groups(model: Any) -> dict[str, str]:
    """state_dict key -> group, from a FusionModel's ``parameter_groups()`` (buffers are absent: shared),
    the mapping the coordinator's strategy averages by."""
    return {name: group for group, names in model.parameter_groups().items() for name in names}


class LayoutMismatch(ValueError):
    """Packed arrays whose layout differs from the receiver's model (another model version or config)."""


@dataclass(frozen=True)
class Slot:
    """Where one tensor sits: array ``key``, elements ``offset`` .. ``offset + size``."""

    name: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    size: int


def _array_key(group: str, dtype: np.dtype) -> str:
    return f"{GROUP_PREFIX}{group}" if dtype == np.float32 else f"{GROUP_PREFIX}{group}/{dtype.name}"


def _spec(value: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, numpy dtype) of a numpy array or a torch tensor, without copying its data."""
    if isinstance(value, np.ndarray):
        return tuple(value.shape), value.dtype
    import torch  # only for a torch state_dict (the site's model)

    return tuple(value.shape), torch.empty((), dtype=value.dtype).numpy().dtype


@dataclass(frozen=True)
class PackLayout:
    """The packing of a set of named tensors: slots in a fixed order (array key, then tensor name)."""

    slots: tuple[Slot, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, Any], parameter_groups: Mapping[str, str]) -> PackLayout:
        """The layout of ``tensors`` (numpy arrays or torch tensors; only shapes and dtypes are read).

        Sorted by array key and name, so it does not depend on the dict's order on either side.
        """
        specs = {name: _spec(value) for name, value in tensors.items()}
        return cls._placed({name: (_array_key(group_of_key(name, parameter_groups), dtype), dtype, shape)
                            for name, (shape, dtype) in specs.items()})

    @classmethod
    def _placed(cls, specs: Mapping[str, tuple[str, np.dtype, tuple[int, ...]]]) -> PackLayout:
        """Slots for ``name -> (array key, dtype, shape)``, offsets assigned in (array key, name) order."""
        slots: list[Slot] = []
        offsets: dict[str, int] = {}
        for name in sorted(specs, key=lambda n: (specs[n][0], n)):
            key, dtype, shape = specs[name]
            size = int(np.prod(shape, dtype=np.int64))
            offset = offsets.get(key, 0)
            slots.append(Slot(name, key, np.dtype(dtype).name, tuple(shape), offset, size))
            offsets[key] = offset + size
        return cls(tuple(slots))

    def to_json(self) -> str:
        """The slots as canonical JSON (array key, name, dtype, shape): what secure aggregation's stage one
        sends beside the packed model so the site's handler can read it (no values)."""
        return json.dumps([[s.key, s.name, s.dtype, list(s.shape)] for s in self.slots], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, sent_sha256: str | None) -> PackLayout:
        """The layout :meth:`to_json` wrote, accepted only when it hashes to ``sent_sha256`` (offsets are
        recomputed here, never read): slots that do not describe the sent arrays are refused."""
        try:
            rows = json.loads(text)
            layout = cls._placed({str(name): (str(key), np.dtype(str(dtype)), tuple(int(d) for d in shape))
                                  for key, name, dtype, shape in rows})
        except (TypeError, ValueError) as err:
            raise LayoutMismatch(f"unreadable packing layout: {err}") from None
        if layout.sha256 != sent_sha256:
            raise LayoutMismatch(f"the packing layout sent hashes to {layout.sha256[:12]}, the message names "
                                 f"{str(sent_sha256)[:12]}")
        return layout

    def subset(self, names: Iterable[str]) -> PackLayout:
        """The layout of only ``names`` (e.g. a reply without the site's private parts), re-placed as
        :meth:`of` would place those tensors."""
        keep = set(names)
        return PackLayout._placed({s.name: (s.key, np.dtype(s.dtype), s.shape) for s in self.slots if s.name in keep})

    @cached_property
    def sha256(self) -> str:
        """What both sides compare: canonical JSON of every slot."""
        rows = [[s.key, s.name, s.dtype, list(s.shape), s.offset] for s in self.slots]
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()

    @cached_property
    def sizes(self) -> dict[str, tuple[int, str]]:
        """Array key -> (elements, dtype name)."""
        out: dict[str, tuple[int, str]] = {}
        for s in self.slots:
            out[s.key] = (s.offset + s.size, s.dtype)
        return out

    def pack(self, tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
        """One Array per array key; every tensor's bytes copied once, unchanged."""
        if set(tensors) != {s.name for s in self.slots}:
            raise LayoutMismatch(f"cannot pack: tensor names differ from the layout's "
                                 f"(extra {sorted(set(tensors) - {s.name for s in self.slots})[:5]}, "
                                 f"missing {sorted({s.name for s in self.slots} - set(tensors))[:5]})")
        # Slots are in offset order within each array key, so an array's bytes are its tensors' bytes joined:
        # one copy, straight from the tensors into the message (no intermediate buffer).
        parts: dict[str, list[memoryview]] = {key: [] for key in self.sizes}
        for s in self.slots:
            value = np.asarray(tensors[s.name])
            if value.shape != s.shape or value.dtype != np.dtype(s.dtype):
                raise LayoutMismatch(f"cannot pack '{s.name}': {value.dtype}{list(value.shape)}, the layout "
                                     f"says {s.dtype}{list(s.shape)}")
            parts[s.key].append(memoryview(np.require(value, requirements="C").reshape(-1).view(np.uint8)))
        return ArrayRecord({key: _npy_array((total,), np.dtype(dtype), parts[key])
                            for key, (total, dtype) in self.sizes.items()})

    def unpack(self, record: ArrayRecord, sent_sha256: str | None) -> dict[str, np.ndarray]:
        """Named tensors (read-only views of the message's bytes), after checking the sender's layout hash."""
        if sent_sha256 != self.sha256:
            raise LayoutMismatch(f"packed arrays use layout {str(sent_sha256)[:12]}, this model's is "
                                 f"{self.sha256[:12]}: the two sides run different model versions or "
                                 "configurations")
        if set(record.keys()) != set(self.sizes):
            raise LayoutMismatch(f"packed arrays {sorted(record.keys())} differ from the layout's "
                                 f"{sorted(self.sizes)}")
        vectors = {}
        for key, (total, dtype) in self.sizes.items():
            vector = decode_vector(record[key])
            if vector.shape != (total,) or vector.dtype != np.dtype(dtype):
                raise LayoutMismatch(f"packed array '{key}' is {vector.dtype}{list(vector.shape)}, the layout "
                                     f"expects {dtype}[{total}]")
            vectors[key] = vector
        return {s.name: vectors[s.key][s.offset:s.offset + s.size].reshape(s.shape) for s in self.slots}


def encode_vector(vector: np.ndarray) -> Array:
    """``Array(vector)`` with the same bytes (``np.save``'s format) in one copy: Flower's constructor writes
    the array through a growing BytesIO in chunks, about twice the time for a model-sized vector."""
    vector = np.require(vector, requirements="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
    if vector.dtype.hasobject:
        raise ValueError("object arrays cannot be sent (they would need pickle)")
    return _npy_array(tuple(vector.shape), vector.dtype, [memoryview(vector.reshape(-1).view(np.uint8))])


def _npy_array(shape: tuple[int, ...], dtype: np.dtype, parts: list[memoryview]) -> Array:
    """The Array of a C-ordered ``dtype`` array of ``shape`` whose bytes are ``parts`` in order (np.save's
    format), joined into the message in one copy."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    data = b"".join([header.getvalue(), *parts])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header.tell() != expected:
        raise LayoutMismatch(f"packed {len(data) - header.tell()} bytes for {dtype}{list(shape)}")
    return Array(dtype=str(dtype), shape=shape, stype="numpy.ndarray", data=data)


def decode_vector(array: Array) -> np.ndarray:
    """The numpy array an Array holds, as a read-only view of its bytes (no copy; ``Array.numpy()`` copies
    them through a BytesIO). Only plain dtypes: an object array (pickle) is refused, as ``np.load`` does."""
    if array.stype != "numpy.ndarray":
        raise LayoutMismatch(f"packed arrays are numpy arrays, got stype {array.stype!r}")
    data = array.data
    header = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(header)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(header)
    except ValueError as err:
        raise LayoutMismatch(f"a packed array is not in numpy's format: {err}") from None
    if dtype.hasobject or fortran and len(shape) > 1:
        raise LayoutMismatch(f"a packed array must be a plain C-ordered array, got {dtype} (fortran={fortran})")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header.tell() != count * dtype.itemsize:
        raise LayoutMismatch(f"a packed array's bytes ({len(data) - header.tell()}) do not match its header "
                             f"({dtype}{list(shape)})")
    return np.frombuffer(data, dtype=dtype, count=count, offset=header.tell()).reshape(shape)


def is_packed(config: Mapping[str, Any] | None) -> bool:
    """Does a message whose ConfigRecord is ``config`` carry packed arrays?"""
    return config is not None and LAYOUT_KEY in config


def sent_layout(config: Mapping[str, Any] | None) -> str | None:
    """The layout hash a ConfigRecord names (None: per-tensor arrays)."""
    return None if config is None or LAYOUT_KEY not in config else str(config[LAYOUT_KEY])


def unpack_tensors(arrays: ArrayRecord, config: Mapping[str, Any] | None, reference: Mapping[str, Any],
                   parameter_groups: Mapping[str, str]) -> dict[str, np.ndarray]:
    """A message's arrays as named tensors: unpacked with the layout of ``reference`` (the tensors the
    receiver expects; checked against the hash ``config`` names), or as sent when they are per-tensor."""
    sent = sent_layout(config)
    if sent is None:
        return {key: value.numpy() for key, value in arrays.items()}
    return PackLayout.of(reference, parameter_groups).unpack(arrays, sent)


# ------------------------------------------------------------------------------------------ a site's side
def received_state(arrays: ArrayRecord, config: Mapping[str, Any] | None, model: Any) -> dict[str, np.ndarray]:
    """The coordinator's arrays as named tensors for ``model`` (its whole state_dict)."""
    groups = name_groups(model) if hasattr(model, "parameter_groups") else {}
    return unpack_tensors(arrays, config, model.state_dict(), groups)


def load_received(arrays: ArrayRecord, config: Mapping[str, Any] | None, model: Any) -> Any:
    """Load the coordinator's arrays into ``model`` strictly: a key or shape mismatch means another model."""
    import torch

    state = received_state(arrays, config, model)
    with warnings.catch_warnings():  # packed tensors are read-only views of the message; load_state_dict copies
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        model.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    return model


def pack_reply(state: Mapping[str, Any], model: Any) -> tuple[ArrayRecord, str]:
    """(packed arrays, layout hash) of what a site sends: ``state`` is the shared part of its state_dict
    (private keys already left out), packed straight from the tensors (one copy, no per-tensor Array)."""
    tensors = {key: value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
               for key, value in state.items()}
    layout = PackLayout.of(tensors, name_groups(model) if hasattr(model, "parameter_groups") else {})
    return layout.pack(tensors), layout.sha256

"""Fused per-sample clipping for DP-SGD (``dp-grad-sample-mode = "fused"``): one backward, no second one.

Why: on the CPU default model Opacus' hooks mode costs ~1.9x a plain step. Its backward computes every
weight gradient *and* every per-sample gradient (through a backward hook per layer), then flattens,
norms and re-sums them. Here (book-keeping / mixed ghost clipping, Bu et al. 2023):

1. Forward hooks keep each trainable layer's input ``a`` and output ``y`` (per call) and put an identity
   "tap" on ``y`` (:class:`_Tap`).
2. ONE ``torch.autograd.grad`` towards a scalar every tap takes as an input: autograd walks through every
   tap but computes no weight gradient (and skips the first convolution's backward: nothing below it
   needs a gradient); each tap hands its output gradient ``g`` over as it arrives, so it is used and freed.
3. Per-sample gradient norms per layer, cheaply: Linear by the ghost norm ``||g_i|| ||a_i||`` (2-D
   input) or the Gram form ``<a_i a_i^T, g_i g_i^T>`` (short token sequences); Conv2d by
   materialising ``g_i unfold(a_i)^T`` (one grouped convolution backward or an unfold view + matmul; the
   same FLOPs as a weight gradient; large layers a slice of the batch at a time); GroupNorm/LayerNorm
   from the layer's own output; Embedding from index matches.
4. Clip factors ``c_i = min(1, C / (||grad_i|| + 1e-6))`` (Opacus' formula) and the clipped sum
   ``sum_i c_i grad_i`` per parameter, written to ``p.grad``: for Linear one matmul ``(c*g)^T a``.

The result is exactly Opacus' flat clipping (hooks mode: the same per-sample gradients of the same loss,
scaled by the batch size for a mean loss, the same clip factors); Opacus' own
``DPOptimizerFastGradientClipping`` then adds N(0, σ²C²) to the sum, divides by the expected batch and
advances the accountant (see ``common.privacy.make_private``).

Supported layers (exact types, so a subclass with its own forward is never silently mis-handled):
``nn.Linear``, ``nn.Conv2d`` (zero padding), ``nn.GroupNorm``, ``nn.LayerNorm``, ``nn.Embedding``
(no ``max_norm``/``sparse``/``scale_grad_by_freq``). A model with any other layer that owns a trainable
parameter is refused (:func:`unsupported_layers`); :func:`verify` also compares the unclipped fused sum
with autograd's gradient on a probe batch, which catches a parameter used outside its layer's forward
(e.g. ``F.linear(x, self.fc.weight)``) or an output changed in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedfusion.common.privacy_policy import PrivacyError

#: Layer types whose per-sample gradients this module computes (exact type match).
SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


class UnsupportedModel(PrivacyError):
    """The model has a trainable layer the fused mode cannot clip per sample (use hooks mode)."""


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    if conv.padding_mode != "zeros":
        return None
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)  # "same", symmetric
    return (int(conv.padding[0]), int(conv.padding[1]))


def _why_unsupported(module: nn.Module) -> str | None:
    if type(module) not in SUPPORTED:
        return type(module).__name__
    if isinstance(module, nn.Conv2d) and _conv_padding(module) is None:
        return f"Conv2d with padding {module.padding!r}/{module.padding_mode}"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse or module.scale_grad_by_freq):
        return "Embedding with max_norm, sparse or scale_grad_by_freq"
    return None


def _trainable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            yield name, module


def unsupported_layers(model: nn.Module) -> list[str]:
    """``"name (why)"`` for each trainable layer the fused mode cannot handle; empty when it can."""
    problems, owner = [], {}
    for name, module in _trainable_layers(model):
        why = _why_unsupported(module)
        if why:
            problems.append(f"{name or '<root>'} ({why})")
        for p in module.parameters(recurse=False):
            if id(p) in owner:
                problems.append(f"{name} (parameter shared with {owner[id(p)]})")
            owner[id(p)] = name
    return problems


#: One call of a layer: its input, its output (detached) and the loss's gradient with respect to that output.
_Call = tuple[Tensor, Tensor, Tensor]


@dataclass
class _Part:
    """One parameter's per-sample squared norms (B,) and a map clip factors (B,) -> clipped sum."""

    param: Tensor
    norm2: Tensor
    clipped: Callable[[Tensor], Tensor]


def _materialised(param: Tensor, per_sample: Tensor) -> _Part:
    flat = per_sample.reshape(per_sample.shape[0], -1)
    return _Part(param, torch.linalg.vector_norm(flat, dim=1).square(), lambda c: (c @ flat).view_as(param))


def _linear_parts(m: nn.Linear, calls: list[_Call], n: int) -> list[_Part]:
    # every call and every token position is one more outer product in the per-sample gradient
    a = torch.cat([x.reshape(n, -1, m.in_features) for x, _, _ in calls], dim=1)
    g = torch.cat([gy.reshape(n, -1, m.out_features) for _, _, gy in calls], dim=1)
    tokens = a.shape[1]
    parts: list[_Part] = []
    if m.weight.requires_grad:
        if tokens == 1:
            a2, g2 = a[:, 0], g[:, 0]
            parts.append(_Part(m.weight, g2.pow(2).sum(1) * a2.pow(2).sum(1), lambda c: (g2 * c[:, None]).t() @ a2))
        elif tokens * tokens * (m.in_features + m.out_features) <= m.in_features * m.out_features:
            norm2 = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

            def clipped(c: Tensor) -> Tensor:
                return (g * c[:, None, None]).reshape(-1, m.out_features).t() @ a.reshape(-1, m.in_features)

            parts.append(_Part(m.weight, norm2, clipped))
        else:
            parts.append(_materialised(m.weight, torch.bmm(g.transpose(1, 2), a)))
    if m.bias is not None and m.bias.requires_grad:
        parts.append(_materialised(m.bias, g.sum(1)))
    return parts


#: Above this many unfolded elements (B x Cin/G x kh x kw x L), per-sample conv gradients come from one grouped
#: convolution backward (groups = B x G) instead of an unfold + matmul: copying a large unfold costs more than
#: the grouped kernel, a small one less (measured on the default cnn_small, CPU, batch 64).
_UNFOLD_LIMIT = 4_000_000


Workspace = dict[Any, Tensor]


def _scratch(workspace: Workspace | None, key: Any, shape: tuple[int, ...], like: Tensor, zero: bool = False) -> Tensor:
    """A buffer kept across steps: fresh multi-megabyte tensors every step cost page faults (glibc returns large
    blocks to the system), which on the default model cost as much as the per-sample arithmetic itself."""
    buf = None if workspace is None else workspace.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = (torch.zeros if zero else torch.empty)(shape, dtype=like.dtype, device=like.device)
        if workspace is not None:
            workspace[key] = buf
    return buf


def _conv_per_sample(m: nn.Conv2d, x: Tensor, y: Tensor, n: int, workspace: Workspace | None = None,
                     call: int = 0) -> Tensor:
    """(B, Cout, Cin/G, kh, kw): each case's weight gradient, ``g_i`` correlated with its own input."""
    groups, out_ch = m.groups, m.out_channels
    pad = _conv_padding(m)
    assert pad is not None  # unsupported_layers refused the others
    kh, kw = m.kernel_size
    positions = y.shape[-1] * y.shape[-2]
    if n * (m.in_channels // groups) * kh * kw * positions > _UNFOLD_LIMIT:
        empty = torch.empty((n * out_ch, m.in_channels // groups, kh, kw), dtype=x.dtype, device=x.device)
        per = torch.ops.aten.convolution_backward(
            y.reshape(1, n * out_ch, *y.shape[-2:]), x.reshape(1, n * m.in_channels, *x.shape[-2:]), empty,
            None, list(m.stride), list(pad), list(m.dilation), False, [0, 0], n * groups, [False, True, False],
        )[1]
        return per.reshape(n, *m.weight.shape)
    (ph, pw), (dh, dw), (th, tw) = pad, m.dilation, m.stride
    if ph or pw:  # zero border written once, the interior every step
        padded = _scratch(workspace, (m, call, "pad"), (n, x.shape[1], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), x,
                          zero=True)
        padded[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]].copy_(x)
    else:
        padded = x
    sb, sc, sh, sw = padded.stride()
    view = padded.as_strided((n, x.shape[1], kh, kw, y.shape[-2], y.shape[-1]),
                             (sb, sc, sh * dh, sw * dw, sh * th, sw * tw))  # unfold as a view, copied once below
    cols = _scratch(workspace, (m, call, "cols"), (n, groups, x.shape[1] // groups * kh * kw, positions), x)
    cols.view(view.shape).copy_(view)
    per = _scratch(workspace, (m, call, "per"), (n, groups, out_ch // groups, cols.shape[2]), x)
    torch.matmul(y.reshape(n, groups, out_ch // groups, positions), cols.transpose(-1, -2), out=per)
    return per.view(n, *m.weight.shape)


#: Per-sample conv gradients up to this many elements (B x weight size) are kept until the clip factors are
#: known (the clipped sum is then one cheap weighted sum); a larger layer's are made a slice of the batch at a
#: time for the norms only, and its clipped sum is one weight gradient of the clip-weighted output gradient.
#: Bounds the extra memory on large backbones (ResNet-18: 64 x 11M) at a weight gradient's cost per layer.
_KEEP_LIMIT = 16_000_000


def _conv_weight_grad(m: nn.Conv2d, x: Tensor, grad_out: Tensor) -> Tensor:
    pad = _conv_padding(m)
    assert pad is not None
    return torch.ops.aten.convolution_backward(
        grad_out, x, m.weight.detach(), None, list(m.stride), list(pad), list(m.dilation), False, [0, 0], m.groups,
        [False, True, False],
    )[1]


def _conv_parts(m: nn.Conv2d, calls: list[_Call], n: int, workspace: Workspace | None = None) -> list[_Part]:
    parts: list[_Part] = []
    if m.weight.requires_grad and n * m.weight.numel() <= _KEEP_LIMIT:
        weight = None
        for call, (x, _, y) in enumerate(calls):
            per = _conv_per_sample(m, x, y, n, workspace, call)
            weight = per if weight is None else weight + per
        parts.append(_materialised(m.weight, weight))
    elif m.weight.requires_grad:
        step = max(1, _KEEP_LIMIT // m.weight.numel())
        norm2 = torch.empty(n, dtype=calls[0][2].dtype, device=calls[0][2].device)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            size = len(range(n)[rows])
            per = sum(_conv_per_sample(m, x[rows], y[rows], size) for x, _, y in calls)
            norm2[rows] = torch.linalg.vector_norm(per.reshape(size, -1), dim=1).square()

        def clipped(c: Tensor) -> Tensor:
            return sum(_conv_weight_grad(m, x, y * c.view(-1, *([1] * (y.ndim - 1)))) for x, _, y in calls)

        parts.append(_Part(m.weight, norm2, clipped))
    if m.bias is not None and m.bias.requires_grad:
        parts.append(_materialised(m.bias, sum(y.reshape(n, m.out_channels, -1).sum(-1) for _, _, y in calls)))
    return parts


def _sum_to(t: Tensor, u: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``(t * u).sum(dims)``; over trailing dimensions as one batched dot product (no full-size temporary)."""
    if not dims:
        return t * u
    if dims == tuple(range(dims[0], t.ndim)):
        return torch.linalg.vecdot(t.flatten(dims[0]), u.flatten(dims[0]))
    return (t * u).sum(dims)


def _norm_parts(m: nn.GroupNorm | nn.LayerNorm, calls: list[_Call], n: int) -> list[_Part]:
    """Per-sample affine gradients: sum over positions of ``g * x_hat`` (weight) and of ``g`` (bias).

    ``x_hat`` comes from the layer's own output, ``(y - b) / w``, so ``sum g x_hat = (sum g y - b sum g) / w``
    needs no second normalisation pass; where a weight is near zero or small against its bias (the
    division would lose digits) the input is normalised again instead.
    """
    group = isinstance(m, nn.GroupNorm)
    weight = bias = None
    w = None if m.weight is None else m.weight.detach()
    b = None if m.bias is None else m.bias.detach()
    from_output = w is not None and bool((w.abs() > 1e-3).all())
    from_output = from_output and (b is None or bool((b.abs() <= 100 * w.abs()).all()))
    for x, y, g in calls:
        dims = tuple(range(2, x.ndim)) if group else tuple(range(1, x.ndim - len(m.normalized_shape)))
        shape = (1, -1) if group else tuple(m.normalized_shape)
        g_sum = g.sum(dims) if dims else g
        if m.weight is None or not m.weight.requires_grad:
            per_w = None
        elif from_output:
            per_w = _sum_to(g, y, dims)
            if b is not None:
                per_w = per_w - b.reshape(shape) * g_sum
            per_w = per_w / w.reshape(shape)
        else:
            if group:
                normed = F.group_norm(x, m.num_groups, eps=m.eps)
            else:
                normed = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            per_w = _sum_to(g, normed, dims)
        if per_w is not None:
            weight = per_w if weight is None else weight + per_w
        bias = g_sum if bias is None else bias + g_sum
    parts = []
    if m.weight is not None and m.weight.requires_grad:
        parts.append(_materialised(m.weight, weight))
    if m.bias is not None and m.bias.requires_grad:
        parts.append(_materialised(m.bias, bias))
    return parts


def _embedding_parts(m: nn.Embedding, calls: list[_Call], n: int) -> list[_Part]:
    if not m.weight.requires_grad:
        return []
    dim = m.embedding_dim
    idx = torch.cat([x.reshape(n, -1) for x, _, _ in calls], dim=1)
    g = torch.cat([gy.reshape(n, -1, dim) for _, _, gy in calls], dim=1)
    if m.padding_idx is not None:  # autograd gives the padding row no gradient; so must its per-sample parts
        g = g * (idx != m.padding_idx).unsqueeze(-1)
    if idx.shape[1] == 1:
        norm2 = g[:, 0].pow(2).sum(1)
    else:  # positions that hit the same row add up before the norm
        same = idx.unsqueeze(2) == idx.unsqueeze(1)
        norm2 = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
    flat_idx = idx.reshape(-1)
    rows = m.num_embeddings

    def clipped(c: Tensor) -> Tensor:
        weighted = (g * c[:, None, None]).reshape(-1, dim)
        if rows <= 256:  # a small table: one matmul with the one-hot rows beats a scatter on CPU
            return F.one_hot(flat_idx, rows).to(weighted.dtype).t() @ weighted
        return torch.zeros_like(m.weight).index_add_(0, flat_idx, weighted)

    return [_Part(m.weight, norm2, clipped)]


def _parts(m: nn.Module, calls: list[_Call], n: int, workspace: Workspace | None = None) -> list[_Part]:
    if isinstance(m, nn.Linear):
        return _linear_parts(m, calls, n)
    if isinstance(m, nn.Conv2d):
        return _conv_parts(m, calls, n, workspace)
    if isinstance(m, nn.GroupNorm | nn.LayerNorm):
        return _norm_parts(m, calls, n)
    return _embedding_parts(m, calls, n)


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to the fused clipping the moment
    autograd has it: used and freed as in a plain backward, instead of every layer's gradient being held to
    the end (which cost ~10 ms of page faults per step on the default model)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, receive: Callable[[Tensor], None]) -> Tensor:
        ctx.receive = receive
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.receive(grad)
        return grad, None, None


@dataclass
class _Collect:
    """What one fused backward gathers: finished parts, and the calls of layers that ran more than once."""

    n: int
    calls: dict[nn.Module, list[tuple[Tensor, Tensor, int]]]
    parts: list[_Part]
    multi: dict[nn.Module, list[_Call]]


class FusedClippingModule(nn.Module):
    """Wraps a model: forward as usual, recording what the fused per-sample clipping needs.

    Use :meth:`loss` to wrap the loss function; its result's ``backward()`` writes the *clipped* sum of
    per-sample gradients to each trainable ``p.grad`` (accumulating, like autograd), for Opacus'
    ``DPOptimizerFastGradientClipping`` to noise. ``loss_reduction="mean"`` means the loss is a batch
    mean, so per-sample gradients are the output gradients times the batch size (as in Opacus).
    The backward is ONE ``torch.autograd.grad`` towards a scalar "anchor" that every layer output's
    :class:`_Tap` takes as an input: autograd walks through every tap but computes no weight gradient.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float, loss_reduction: str = "mean") -> None:
        super().__init__()
        problems = unsupported_layers(module)
        if problems:
            raise UnsupportedModel(
                "dp-grad-sample-mode 'fused' supports Linear, Conv2d, GroupNorm, LayerNorm and Embedding layers "
                f"only; this model also has {', '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}: "
                "use 'auto' (falls back to Opacus' hooks) or 'hooks'"
            )
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self._layers = [m for _, m in _trainable_layers(module)]
        self._calls: dict[nn.Module, list[tuple[Tensor, Tensor, int]]] = {}
        self._anchors: dict[torch.device, Tensor] = {}
        self._collect: _Collect | None = None
        self._workspace: Workspace = {}
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._calls = {}  # a forward without backward (evaluation in train mode) must not leak into the next
        return self._module(*args, **kwargs)

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return None
        rows = self._calls.setdefault(module, [])
        index = len(rows)
        rows.append((inputs[0].detach(), output.detach(), output._version))  # detach() shares the version counter
        anchor = self._anchors.get(output.device)
        if anchor is None:
            anchor = self._anchors[output.device] = torch.zeros((), device=output.device, requires_grad=True)
        return _Tap.apply(output, anchor, lambda grad: self._receive(module, index, grad))

    def _receive(self, module: nn.Module, index: int, grad: Tensor) -> None:
        collect = self._collect
        if collect is None:  # a backward that is not the fused one (verify's reference gradient)
            return
        rows = collect.calls[module]
        x, y, version = rows[index]
        if y._version != version:
            raise UnsupportedModel(
                f"fused clipping: the output of {type(module).__name__} was changed in place after the layer ran "
                "(e.g. ReLU(inplace=True)); use inplace=False or dp-grad-sample-mode 'hooks'"
            )
        if len(rows) == 1:
            collect.parts.extend(_parts(module, [(x, y, grad)], collect.n, self._workspace))
        else:
            collect.multi.setdefault(module, []).append((x, y, grad))

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._calls = {}
        self._workspace = {}

    def loss(self, loss_fn: Callable[..., Tensor]) -> Callable[..., FusedLoss]:
        """``loss_fn`` whose result's ``backward()`` runs the fused clipping (see :class:`FusedLoss`)."""

        def wrapped(*args: Any, **kwargs: Any) -> FusedLoss:
            return FusedLoss(loss_fn(*args, **kwargs), self)

        wrapped.class_weights = getattr(loss_fn, "class_weights", None)  # type: ignore[attr-defined]
        return wrapped

    def _per_sample_parts(self, loss: Tensor, retain_graph: bool = False) -> tuple[list[_Part], int]:
        """One autograd pass through every tap; each layer's parts are made as its output gradient arrives."""
        calls, self._calls = self._calls, {}
        if not calls:
            return [], 0
        sizes = {int(x.shape[0]) for rows in calls.values() for x, _, _ in rows}
        if len(sizes) != 1:
            raise PrivacyError(f"fused clipping needs one batch size in every layer, got {sorted(sizes)}")
        collect = self._collect = _Collect(sizes.pop(), calls, [], {})
        try:
            torch.autograd.grad(loss, list(self._anchors.values()), allow_unused=True, retain_graph=retain_graph)
        finally:
            self._collect = None
        parts = collect.parts + [p for m, rows in collect.multi.items() for p in _parts(m, rows, collect.n,
                                                                                         self._workspace)]
        return parts, collect.n

    def clipped_backward(self, loss: Tensor) -> None:
        """Write sum_i min(1, C/||grad_i||) grad_i into each trainable ``p.grad`` (added to what is there)."""
        parts, n = self._per_sample_parts(loss)
        scale = float(n) if self.loss_reduction == "mean" else 1.0
        if parts:
            norms = torch.stack([part.norm2 for part in parts]).sum(0).sqrt() * scale
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * scale
        for part in parts:
            grad = part.clipped(factors).detach()
            part.param.grad = grad if part.param.grad is None else part.param.grad + grad
        for m in self._layers:  # a layer the batch never reached has zero per-sample gradients
            for p in m.parameters(recurse=False):
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)


class FusedLoss:
    """A loss value whose ``backward()`` is the fused clipped backward (Opacus' ghost loss does the same)."""

    def __init__(self, value: Tensor, module: FusedClippingModule) -> None:
        self.value = value
        self.module = module

    def backward(self) -> None:
        self.module.clipped_backward(self.value)

    def detach(self) -> Tensor:
        return self.value.detach()

    def item(self) -> float:
        return float(self.value.item())


def verify(module: FusedClippingModule, batch: Mapping[str, Tensor], loss_fn: Callable[..., Tensor],
           rtol: float = 1e-3) -> None:
    """Check on a probe batch that the fused parts sum (unclipped) to autograd's gradient of the same loss.

    Catches what a static check cannot: a parameter read outside its layer's forward, an output used
    through a path the hooks do not see. Costs one small forward and backward; no step, no privacy spent.
    """
    params = [p for m in module._layers for p in m.parameters(recurse=False) if p.requires_grad]
    try:
        loss = loss_fn(module(batch), batch)
        if isinstance(loss, FusedLoss):
            loss = loss.value
        if not loss.requires_grad:  # e.g. a survival batch without events: nothing to compare on this probe
            module._calls = {}
            return
        parts, n = module._per_sample_parts(loss, retain_graph=True)  # of the loss itself: they sum to its gradient
        expected = torch.autograd.grad(loss, params, allow_unused=True)
    except RuntimeError as err:
        why = ("a layer's output is changed in place (e.g. ReLU(inplace=True))" if "inplace" in str(err)
               else str(err).splitlines()[0])
        raise UnsupportedModel(f"fused clipping cannot run this model: {why}; use dp-grad-sample-mode 'hooks'") from err
    got = {id(part.param): part.clipped(torch.ones(n, device=loss.device)) for part in parts}
    for p, want in zip(params, expected, strict=True):
        want = torch.zeros_like(p) if want is None else want
        have = got.get(id(p), torch.zeros_like(p))
        if not torch.allclose(have, want, rtol=rtol, atol=1e-6 + rtol * float(want.abs().max())):
            name = next(k for k, q in module._module.named_parameters() if q is p)
            raise UnsupportedModel(
                f"fused clipping does not reproduce the gradient of '{name}' (a parameter used outside its "
                "layer's forward?); use dp-grad-sample-mode 'hooks'"
            )

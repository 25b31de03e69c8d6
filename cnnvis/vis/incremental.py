"""Occlusion by incremental inference (Krypton: Nakandala, Kumar & Papakonstantinou, "Incremental
and Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019).

An occluding window changes only part of each layer's output: the part inside the window's
projective field. The engine runs the network once on the unoccluded images and keeps every
layer's output; then, for a batch of window positions, it recomputes each layer only on a
rectangle that holds the changed part (plus the halo the layer's kernel reads), using the cached
maps outside it, and switches to whole maps at the first layer where the rectangle covers
:data:`FULL_FRACTION` of the map or more (decided per layer from the rectangle's size).

Batching: within a batch every position's rectangle has the same size (the largest any of them
needs, its start moved inwards at the border), so a layer's changed parts form one dense
``[Q, C, h, w]`` tensor and run as one convolution. A layer's input crop is gathered with one
``index_select`` from a channels-last table holding the cached map, the padding value and the
previous layer's changed parts, so pasting and padding cost no Python loop over positions.
Global average pooling is updated from the changed sum (exact, in float64), so a map never has to be
materialised when the rectangle stays small up to the end.

``approximate=tau`` is Krypton's projective-field thresholding (sec. 4.1): a rectangle is never
allowed to grow beyond ``tau`` of its map's side; changes outside it are dropped (centred crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from cnnvis.vis.incremental_graph import NotSupported, Op, run_node, trace

#: float elements the cached maps of one engine may take (0.5 GiB in float32, counting the gather tables);
#: more images than fit are swept in turns (:meth:`IncrementalOcclusion.images_per_cache`)
CACHE_ELEMENTS = 2**27

#: a layer whose changed rectangle covers this share of its map (or more) is computed whole, and so is
#: everything after it. Gathering a rectangle's input costs little next to its convolution, so only a
#: rectangle that is nearly the map is not worth it: on ResNet-18 (224 px, 16/8) and mnist_cnn (4/1),
#: one thread, 0.9 and 1.0 ran 1.1-1.4x faster than 0.5 or 0.7 (the machine was shared; noisy)
FULL_FRACTION = 0.9

#: the same switch where the approximate mode's cap cut the rectangle: a capped rectangle that still
#: covers half its map saves little and, on small maps (ResNet's 7x7 layer4, where tau=0.6 keeps 5 of
#: 7 rows), drops much of the change (ResNet-18 224 px, tau=0.6: SSIM 0.57 against exact with whole maps
#: only at FULL_FRACTION, 0.99 with this rule)
APPROXIMATE_FULL_FRACTION = 0.5

__all__ = ["APPROXIMATE_FULL_FRACTION", "CACHE_ELEMENTS", "FULL_FRACTION", "IncrementalOcclusion", "NotSupported"]


@dataclass
class Span:
    """Changed rows (or columns) of one map for every window position along that axis: ``[lo, hi)``."""

    size: int
    lo: Tensor
    hi: Tensor

    def length(self, index: Tensor | None = None) -> int:
        sizes = self.hi - self.lo if index is None else (self.hi - self.lo)[index]
        return int(sizes.max())

    def start(self, index: Tensor, length: int) -> Tensor:
        return self.lo[index].clamp(max=self.size - length)


@dataclass
class Changed:
    """One batch's value of a layer still computed on rectangles: ``patch`` at ``(y0, x0)`` over the cache."""

    patch: Tensor | None  #: [Q, C, h, w]; None for the input before the window is drawn
    y0: Tensor
    x0: Tensor


def _window_span(span: Span, kernel: int, stride: int, padding: int, dilation: int, size: int) -> Span:
    # output y reads input rows y*s - p .. y*s - p + d(k-1): it changes iff that range meets [lo, hi)
    lo = torch.div(span.lo + padding - dilation * (kernel - 1) + stride - 1, stride, rounding_mode="floor")
    hi = torch.div(span.hi - 1 + padding, stride, rounding_mode="floor") + 1
    return Span(size, lo.clamp(min=0), hi.clamp(max=size))


def _cap(span: Span, tau: float | None) -> Span:
    """Krypton's projective-field threshold: at most ``ceil(tau * size)`` rows, centred on the change."""
    if tau is None:
        return span
    cap = max(1, math.ceil(tau * span.size))
    over = (span.hi - span.lo) > cap
    centre_lo = torch.div(span.lo + span.hi - cap, 2, rounding_mode="floor").clamp(0, span.size - cap)
    lo = torch.where(over, centre_lo, span.lo)
    return Span(span.size, lo, torch.where(over, lo + cap, span.hi))


class IncrementalOcclusion:
    """Logits of occluded copies of ``images`` computed incrementally; raises :class:`NotSupported`.

    ``window``/``stride`` as in :func:`cnnvis.vis.occlusion.occlusion_maps`; ``fill`` is the baseline
    expanded to the images' shape. Call under ``torch.no_grad()`` with the model in eval mode.
    """

    def __init__(self, model: nn.Module, images: Tensor, fill: Tensor, window: tuple[int, int],
                 stride: tuple[int, int], approximate: float | None = None) -> None:
        if approximate is not None and not 0.0 < approximate <= 1.0:
            raise ValueError(f"approximate must be in (0, 1], got {approximate!r}")
        self.gm, self.ops = trace(model)
        self.x, self.fill, self.tau = images, fill, approximate
        _, _, h, w = images.shape
        dev = images.device
        nh, nw = math.ceil((h - window[0]) / stride[0]) + 1, math.ceil((w - window[1]) / stride[1]) + 1
        rows_lo, cols_lo = torch.arange(nh, device=dev) * stride[0], torch.arange(nw, device=dev) * stride[1]
        self.window_rows = Span(h, rows_lo, (rows_lo + window[0]).clamp(max=h))
        self.window_cols = Span(w, cols_lo, (cols_lo + window[1]).clamp(max=w))
        self.base: dict[fx.Node, Any] = {}
        self.mode: dict[fx.Node, str] = {}  # changed / whole / const
        self.spans: dict[fx.Node, tuple[Span, Span]] = {}
        self.tables: dict[fx.Node, Tensor] = {}
        self.integrals: dict[fx.Node, Tensor] = {}  # float64 summed-area tables of global pools' inputs
        self._base_pass()
        self._plan()

    # ------------------------------------------------------------------ planning

    def _base_pass(self) -> None:
        env: dict[fx.Node, Any] = {}
        for op in self.ops:
            if op.kind == "input":
                env[op.node] = self.x
            elif op.kind == "output":
                env[op.node] = env[op.inputs[0]]
            else:
                env[op.node] = run_node(self.gm, op, env)
        self.base = env

    def _plan(self) -> None:
        """Follow the changed region through the graph and pick, per node, rectangles or whole maps."""
        self.first_whole: str | None = None
        self.macs = [0, 0]  # multiply-adds per occluded copy: [this plan, whole maps]
        #: the largest tensor one occluded copy puts through the plan (for the batching rule)
        self.sample_elements = 1
        for op in self.ops:
            node = op.node
            deps = [self.mode[i] for i in op.inputs if self.mode[i] != "const"]
            if op.kind == "input":
                self.input_node = node
                self.mode[node] = "changed"
                self.spans[node] = (self.window_rows, self.window_cols)
                continue
            if not deps:
                self.mode[node] = "const"
                continue
            if op.kind == "window" and isinstance(self.base[node], Tensor):
                full = self.base[node].shape[-2] * self.base[node].shape[-1] * op.window.macs_per_output
                self.macs[1] += full
            whole = "whole" in deps or "gpool" in deps  # a global pool's output is a whole (1x1) map
            if not whole:
                whole = self._plan_changed(op)
            if whole:
                self.mode[node] = "whole"
                if isinstance(self.base[node], Tensor) and self.base[node].ndim:
                    self.sample_elements = max(self.sample_elements, self.base[node][0].numel())
                if self.first_whole is None and op.kind not in ("output", "gpool"):
                    self.first_whole = op.name
                if op.kind == "window":
                    self.macs[0] += full
            elif op.kind == "window":
                rows, cols = self.spans[node]
                self.macs[0] += rows.length() * cols.length() * op.window.macs_per_output
                crop = self.base[op.inputs[0]].shape[1] * ((rows.length() - 1) * op.window.stride[0] + op.window.kernel[0]) \
                    * ((cols.length() - 1) * op.window.stride[1] + op.window.kernel[1])
                self.sample_elements = max(self.sample_elements, crop)

        # pointwise nodes whose input, within a batch, is a fresh tensor read by no other node
        self.inplace = {op.node for op in self.ops if op.kind == "pointwise" and self._sole_reader(op)}

    def _sole_reader(self, op: Op) -> bool:
        source = op.inputs[0]
        kinds = {o.node: o.kind for o in self.ops}
        while True:
            if len(source.users) != 1 or self.mode[source] == "const":
                return False
            if kinds[source] not in ("alias", "window", "add", "pointwise"):
                return False
            if kinds[source] != "alias":
                return True
            source = source.all_input_nodes[0]

    def _plan_changed(self, op: Op) -> bool:
        """Plan ``op`` whose inputs are all rectangles; True if it must run on whole maps."""
        node = op.node
        if any(self.mode[i] == "const" for i in op.inputs) and op.kind not in ("sink", "output"):
            raise NotSupported(f"{op.name} mixes a constant tensor into the changed maps")
        if op.kind in ("pointwise", "alias"):
            self.spans[node] = self.spans[op.inputs[0]]
            self.mode[node] = "changed"
            return False
        if op.kind == "window":
            rows, cols = self.spans[op.inputs[0]]
            out = self.base[node]
            win = op.window
            free_rows = _window_span(rows, win.kernel[0], win.stride[0], win.padding[0], win.dilation[0], out.shape[-2])
            free_cols = _window_span(cols, win.kernel[1], win.stride[1], win.padding[1], win.dilation[1], out.shape[-1])
            rows, cols = _cap(free_rows, self.tau), _cap(free_cols, self.tau)
            self.spans[node] = (rows, cols)
            self.mode[node] = "changed"
            # decided from this layer's rectangle: at FULL_FRACTION of the map, whole maps are cheaper
            capped = rows.length() < free_rows.length() or cols.length() < free_cols.length()
            share = APPROXIMATE_FULL_FRACTION if capped else FULL_FRACTION
            return rows.length() * cols.length() >= share * rows.size * cols.size
        if op.kind == "add":
            (ra, ca), (rb, cb) = (self.spans[i] for i in op.inputs)
            if self.base[op.inputs[0]].shape != self.base[op.inputs[1]].shape:
                raise NotSupported(f"{op.name}: a sum that broadcasts")
            rows = _cap(Span(ra.size, torch.minimum(ra.lo, rb.lo), torch.maximum(ra.hi, rb.hi)), self.tau)
            cols = _cap(Span(ca.size, torch.minimum(ca.lo, cb.lo), torch.maximum(ca.hi, cb.hi)), self.tau)
            self.spans[node] = (rows, cols)
            self.mode[node] = "changed"
            return False
        if op.kind == "gpool":
            base = self.base[op.inputs[0]].double()
            integral = torch.zeros(*base.shape[:2], base.shape[2] + 1, base.shape[3] + 1, dtype=torch.float64,
                                   device=base.device)
            integral[:, :, 1:, 1:] = base.cumsum(2).cumsum(3)
            self.integrals[node] = integral
            self.mode[node] = "gpool"
            return False
        if op.kind in ("sink", "output"):
            return True
        raise NotSupported(f"{op.name} is not supported")

    def images_per_cache(self) -> int:
        """How many images an engine may hold within :data:`CACHE_ELEMENTS`, judged from this one's cache."""
        unique = {t.data_ptr(): t.numel() for t in self.base.values() if isinstance(t, Tensor) and t.ndim == 4}
        per_image = 2 * sum(unique.values()) // len(self.x)  # the maps, and their channels-last gather tables
        return max(1, CACHE_ELEMENTS // max(1, per_image))

    # ------------------------------------------------------------------ one batch

    def logits(self, rows: Tensor, cols: Tensor, img: Tensor) -> Tensor:
        """Model output for occluded copies: window row ``rows[q]``, column ``cols[q]`` over image ``img[q]``."""
        env: dict[fx.Node, Any] = {}
        self._written: set[fx.Node] = set()
        self._materialised: dict[fx.Node, Tensor] = {}
        q = len(img)
        for op in self.ops:
            node, mode = op.node, self.mode[op.node]
            if mode == "const":
                env[node] = self.base[node]
            elif op.kind == "input":
                env[node] = self._input(rows, cols, img)
            elif mode == "gpool":
                env[node] = self._gpool(op, env, img)
            elif mode == "whole":
                args = {i: self._whole(i, env[i], img) if self.mode[i] == "changed" else env.get(i) for i in op.inputs}
                if op.kind == "output":
                    return args[op.inputs[0]]
                for i in op.inputs:
                    if self.mode[i] == "const":
                        args[i] = self.base[i]
                env[node] = run_node(self.gm, op, args, inplace=op.node in self.inplace)
            else:
                env[node] = self._changed(op, env, rows, cols, img, q)
        raise NotSupported("the graph has no output")  # unreachable for traced graphs

    def _rect(self, node: fx.Node, rows: Tensor, cols: Tensor) -> tuple[Tensor, int, Tensor, int]:
        span_r, span_c = self.spans[node]
        hr, wc = span_r.length(rows), span_c.length(cols)
        return span_r.start(rows, hr), hr, span_c.start(cols, wc), wc

    def _input(self, rows: Tensor, cols: Tensor, img: Tensor) -> Changed:
        y0, h, x0, w = self._rect(self.input_node, rows, cols)
        sel = (torch.arange(h, device=y0.device) + y0[:, None])  # [Q, h] absolute rows
        selc = (torch.arange(w, device=x0.device) + x0[:, None])
        inside = ((sel >= self.window_rows.lo[rows, None]) & (sel < self.window_rows.hi[rows, None]))[:, :, None] \
            & ((selc >= self.window_cols.lo[cols, None]) & (selc < self.window_cols.hi[cols, None]))[:, None, :]
        iy, ix = sel[:, :, None], selc[:, None, :]
        image = self.x.permute(0, 2, 3, 1)[img[:, None, None], iy, ix]  # [Q, h, w, C]
        fill = self.fill.permute(0, 2, 3, 1)[img[:, None, None], iy, ix]
        patch = torch.where(inside[..., None], fill, image).permute(0, 3, 1, 2)
        return Changed(patch, y0, x0)

    def _changed(self, op: Op, env: dict[fx.Node, Any], rows: Tensor, cols: Tensor, img: Tensor, q: int) -> Changed:
        node = op.node
        if op.kind in ("pointwise", "alias"):
            src: Changed = env[op.inputs[0]]
            if op.kind == "alias":
                return Changed(src.patch, src.y0, src.x0)
            fn = op.fn_ if node in self.inplace and op.fn_ is not None else op.fn
            return Changed(fn(src.patch), src.y0, src.x0)
        y0, h, x0, w = self._rect(node, rows, cols)
        if op.kind == "window":
            win = op.window
            src_node = op.inputs[0]
            crop_h = (h - 1) * win.stride[0] + win.dilation[0] * (win.kernel[0] - 1) + 1
            crop_w = (w - 1) * win.stride[1] + win.dilation[1] * (win.kernel[1] - 1) + 1
            crop = self._gather(src_node, env[src_node], img, y0 * win.stride[0] - win.padding[0], crop_h,
                                x0 * win.stride[1] - win.padding[1], crop_w, win.pad_value)
            return Changed(win.run(crop, (0, 0)), y0, x0)
        # add: both operands on the hull rectangle
        a, b = (self._on_rect(i, env[i], img, y0, h, x0, w) for i in op.inputs)
        return Changed(a + b, y0, x0)

    def _on_rect(self, node: fx.Node, value: Changed, img: Tensor, y0: Tensor, h: int, x0: Tensor, w: int) -> Tensor:
        if value.patch.shape[-2:] == (h, w) and torch.equal(value.y0, y0) and torch.equal(value.x0, x0):
            return value.patch
        return self._gather(node, value, img, y0, h, x0, w, 0.0)

    def _gpool(self, op: Op, env: dict[fx.Node, Any], img: Tensor) -> Tensor:
        """Global average pool: the cached map's sum, minus the rectangle's cached sum, plus its new sum."""
        value: Changed = env[op.inputs[0]]
        integral = self.integrals[op.node]
        h, w = value.patch.shape[-2:]
        y0, x0, y1, x1 = value.y0, value.x0, value.y0 + h, value.x0 + w
        rect = (integral[img, :, y1, x1] - integral[img, :, y0, x1] - integral[img, :, y1, x0]
                + integral[img, :, y0, x0])
        total = integral[img, :, -1, -1]
        area = (integral.shape[-2] - 1) * (integral.shape[-1] - 1)
        pooled = (total - rect + value.patch.sum(dim=(2, 3), dtype=torch.float64)) / area
        return pooled.to(value.patch.dtype)[:, :, None, None]

    def _whole(self, node: fx.Node, value: Changed, img: Tensor) -> Tensor:
        """The whole map of every copy: the cache with the changed rectangle pasted in."""
        if node in self._materialised:
            return self._materialised[node]
        _, _, h, w = self.base[node].shape
        zero = torch.zeros_like(img)
        self._materialised[node] = self._gather(node, value, img, zero, h, zero, w, 0.0)
        return self._materialised[node]

    def _table(self, node: fx.Node, value: Changed, img: Tensor) -> tuple[Tensor, int]:
        """Rows: the cached map (channels last), one row of zeros, one of -inf, then this batch's patch."""
        base = self.base[node]
        n, c, hh, ww = base.shape
        offset = n * hh * ww + 2
        need = offset + (value.patch[0].numel() // c * len(img) if value.patch is not None else 0)
        table = self.tables.get(node)
        if table is None or table.shape[0] < need:
            table = torch.empty(max(need, 0 if table is None else table.shape[0]), c, dtype=base.dtype,
                                device=base.device)
            table[: n * hh * ww] = base.permute(0, 2, 3, 1).reshape(-1, c)
            table[n * hh * ww] = 0.0
            table[n * hh * ww + 1] = float("-inf")
            self.tables[node] = table
            self._written.discard(node)
        if value.patch is not None and node not in self._written:
            table[offset:need] = value.patch.permute(0, 2, 3, 1).reshape(-1, c)
            self._written.add(node)
        return table, offset

    def _gather(self, node: fx.Node, value: Changed, img: Tensor, r0: Tensor, rh: int, c0: Tensor, cw: int,
                pad_value: float) -> Tensor:
        """``[Q, C, rh, cw]``: rows ``r0[q] ..``, columns ``c0[q] ..`` of each copy's map (may reach into the padding)."""
        table, offset = self._table(node, value, img)
        _, c, hh, ww = self.base[node].shape
        dev = r0.device
        rows = r0[:, None] + torch.arange(rh, device=dev)
        cols = c0[:, None] + torch.arange(cw, device=dev)
        in_map = ((rows >= 0) & (rows < hh))[:, :, None] & ((cols >= 0) & (cols < ww))[:, None, :]
        idx = (img * (hh * ww))[:, None, None] + (rows.clamp(0, hh - 1) * ww)[:, :, None] + cols.clamp(0, ww - 1)[:, None, :]
        idx = torch.where(in_map, idx, offset - 2 if pad_value == 0.0 else offset - 1)
        if value.patch is not None:
            ph, pw = value.patch.shape[-2:]
            pr, pc = rows - value.y0[:, None], cols - value.x0[:, None]
            in_patch = ((pr >= 0) & (pr < ph))[:, :, None] & ((pc >= 0) & (pc < pw))[:, None, :]
            q = torch.arange(len(img), device=dev)
            pidx = offset + (q * (ph * pw))[:, None, None] + (pr.clamp(0, ph - 1) * pw)[:, :, None] \
                + pc.clamp(0, pw - 1)[:, None, :]
            idx = torch.where(in_patch, pidx, idx)
        return table.index_select(0, idx.view(-1)).view(len(img), rh, cw, c).permute(0, 3, 1, 2)

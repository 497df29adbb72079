"""The book-keeping ("ghost") engine's per-layer rules: per-example weight gradients, and
their squared norms, of ``Linear``, ``Conv2d`` and ``GroupNorm`` layers from each layer's input
and the gradient of the summed loss with respect to its output (Bu et al. 2022).

:mod:`mechanisms.per_example` drives them (clipping, tied weights, the ``auto`` choice of
engine); this module holds the layer algebra and its scratch memory. Convolutions go by
patch matrices in chunks, shifted-window patches (narrow layers) or torch's grouped
convolution backward (patch matrices too large); all tested against a loop oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GHOST_TYPES", "LayerRule", "Workspace", "ghost_rules"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# Largest patch matrix (elements) of one example that the per-example conv rule builds;
# beyond it, the grouped convolution backward (no patch matrix) is used.
PATCH_LIMIT = 2**24
# Patch matrices are built and multiplied this many bytes of examples at a time.
PATCH_CHUNK_BYTES = 2**21
# Convolutions whose channels-last patch rows are shorter than this (kernel width x input
# channels, e.g. a first layer on 1-3 channel images) build their patches by shifted windows
# instead (see ``_conv_shifted``): copying 8-float rows ran at a sixth of memcpy speed.
SHIFTED_MAX_RUN = 32


GHOST_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm)


class Workspace:
    """Scratch buffers reused from step to step by the ghost engine.

    The per-example temporaries (patch matrices, per-example weight gradients) are several MB;
    allocating them afresh each step costs page faults that on CPU double the engine's time.
    A workspace keeps one flat buffer per key, grown as needed, and hands out views of it.
    Views are only valid until the next call that uses the same workspace.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}

    def get(
        self, key: tuple[int, str], shape: tuple[int, ...], like: torch.Tensor, *, zeroed: bool = False
    ) -> torch.Tensor:
        """A view of shape ``shape`` of the buffer ``key``.

        With ``zeroed`` the buffer is filled with zeros when it is (re)allocated only: callers
        that write the same region on every call keep the rest at zero without refilling it.
        """
        numel = 1
        for s in shape:
            numel *= s
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            # 25% headroom: Poisson lots vary in size, and growing by exactly the size asked
            # for would reallocate (and page-fault through fresh memory) at every new largest
            # lot; with headroom that happens once or twice in a run.
            make = torch.zeros if zeroed else torch.empty
            buf = make(numel + numel // 4, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def _channels_last_only(t: torch.Tensor) -> bool:
    """True when ``t`` is laid out channels-last and not also contiguous (NCHW)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _phase_shape(module: nn.Conv2d, a: torch.Tensor) -> tuple[int, int]:
    """Rows and columns (hq, wq) of one stride-phase plane of ``a``'s zero-padded input."""
    (sh, sw), (ph, pw) = module.stride, module.padding
    return -(-(a.shape[2] + 2 * ph) // sh), -(-(a.shape[3] + 2 * pw) // sw)


def _chunks(b: int, bytes_per_example: int) -> tuple[int, list[tuple[int, int]]]:
    """Chunk size and (start, stop) of consecutive chunks of ``b`` examples that take
    ``PATCH_CHUNK_BYTES`` at a time."""
    chunk = max(1, min(b, PATCH_CHUNK_BYTES // bytes_per_example))
    return chunk, [(start, min(b, start + chunk)) for start in range(0, b, chunk)]


class LayerRule:
    """Per-example squared gradient norms of one layer, and its clipped gradient sum.

    Built from the layer's input ``a`` and the gradient ``g`` of the summed loss with respect
    to its output: for example i, the layer's parameter gradient depends on ``a[i]`` and
    ``g[i]`` only (no BatchNorm), which is what makes one backward pass enough.
    """

    def __init__(
        self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, ws: Workspace, occurrence: int = 0
    ) -> None:
        self.module = module
        self.ws = ws
        self.occurrence = occurrence  # a module applied twice in a forward pass: 0, then 1
        self.parts: dict[str, torch.Tensor] = {}  # name -> per-example gradient [B, ...]
        self.linear: tuple[torch.Tensor, torch.Tensor] | None = None
        # "patches_by_output": the conv weight's per-example gradient has layout
        # [B, kh, kw, C, O] (the patch routes); "standard": [B, O, C, kh, kw]
        self.conv_layout = "standard"
        self.sq = torch.zeros(a.shape[0], dtype=g.dtype, device=g.device)
        if isinstance(module, nn.Linear):
            self._linear(module, a, g)
        elif isinstance(module, nn.Conv2d):
            self._conv(module, a, g)
        elif isinstance(module, nn.GroupNorm):
            self._group_norm(module, a, g)
        else:  # pragma: no cover - guarded by ghost_supported
            raise TypeError(f"no book-keeping rule for {type(module).__name__}")

    def _wants(self, name: str) -> bool:
        p = getattr(self.module, name, None)
        return p is not None and p.requires_grad

    def _add(self, name: str, per_example: torch.Tensor) -> None:
        self.parts[name] = per_example
        # vector_norm needs no full-size temporary, unlike pow(2).sum()
        self.sq += torch.linalg.vector_norm(per_example.flatten(1), dim=1).square()

    def _buffer(
        self,
        name: str,
        shape: tuple[int, ...],
        like: torch.Tensor,
        *,
        zeroed: bool = False,
        region: tuple[int, ...] = (),
    ) -> torch.Tensor:
        # Each application of a module has buffers of its own. A buffer with a zero border is
        # also keyed by its shape and by the ``region`` that callers write (when the shape
        # alone does not fix it), so that the border never moves: a border cell is never
        # written, or it would keep a stale value.
        key = f"{name}#{self.occurrence}" + (f":{shape[1:]}:{region}" if zeroed else "")
        return self.ws.get((id(self.module), key), shape, like, zeroed=zeroed)

    def _linear(self, module: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> None:
        if a.dim() == 2:
            # Ghost norm: ||g_i a_i^T||_F = ||g_i|| ||a_i||; the clipped sum is one matmul.
            if self._wants("weight"):
                self.sq += g.pow(2).sum(1) * a.pow(2).sum(1)
                self.linear = (a, g)
            if self._wants("bias"):
                self._add("bias", g)
            return
        a3, g3 = a.flatten(1, -2), g.flatten(1, -2)
        if self._wants("weight"):
            self._add("weight", torch.bmm(g3.transpose(1, 2), a3))
        if self._wants("bias"):
            self._add("bias", g3.sum(1))

    def _conv(self, module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> None:
        b, o = g.shape[:2]
        if _channels_last_only(g):
            g2 = g.permute(0, 2, 3, 1).view(b, -1, o).transpose(1, 2)  # [B, O, L], no copy
        else:
            g2 = g.reshape(b, o, -1)
        if self._wants("weight"):
            # Patch matrices + batched GEMM are the faster route on CPU (measured on the cnn:
            # conv2 2.1 ms against 9.1 ms for the grouped backward, conv1 2.8 against 3.5);
            # the grouped convolution backward is kept for layers whose patch matrix would be
            # too large to hold.
            kh, kw = module.kernel_size
            if g2.shape[2] * kh * kw * a.shape[1] <= PATCH_LIMIT:
                if module.dilation == (1, 1) and kw * a.shape[1] < SHIFTED_MAX_RUN:
                    self._add("weight", self._conv_shifted(module, a, g))
                else:
                    self._add("weight", self._conv_patches(module, a, g2))
            else:
                self._add("weight", self._conv_grouped(module, a, g))
        if self._wants("bias"):
            self._add("bias", g2.sum(2))

    def _patch_view(self, module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
        """A strided view [B, Ho, Wo, kh, kw, C] of every example's patches (no copy yet).

        Patches are taken in channels-last order (about twice as fast as F.unfold on CPU).
        """
        (kh, kw), (sh, sw) = module.kernel_size, module.stride
        (ph, pw), (dh, dw) = module.padding, module.dilation
        b, c, h, w = a.shape
        x = a.permute(0, 2, 3, 1)  # a view when ``a`` is channels-last
        if ph or pw:
            # Zero padding: the border of this buffer is zero from its allocation and never
            # written; only the interior is (one copy, which also does the layout change).
            padded = self._buffer("padded", (b, h + 2 * ph, w + 2 * pw, c), a, zeroed=True)
            padded[:, ph : ph + h, pw : pw + w, :].copy_(x)
            x = padded
        elif not x.is_contiguous():
            x = x.contiguous()
        x = x.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)
        return x[..., ::dh, ::dw].permute(0, 1, 2, 4, 5, 3)

    def _patch_chunks(
        self, module: nn.Conv2d, a: torch.Tensor, fill: bool = True
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Patch matrices [c, L, kh*kw*C] of consecutive chunks of examples: (start, stop, P).

        A chunk of examples at a time, so that a chunk's patches are still in cache when they
        are used (a DP-SGD epoch of the cnn measured 6% faster than whole lots). Each chunk
        overwrites the previous one's buffer. ``fill=False`` leaves the buffer as it is (only
        for timing ablations, bench/dpsgd_breakdown.py).
        """
        x = self._patch_view(module, a)
        b, k = x.shape[0], x[0, 0, 0].numel()
        chunk, ranges = _chunks(b, x[0].numel() * a.element_size())
        cols = self._buffer("cols", (chunk, *x.shape[1:]), a)
        for start, stop in ranges:
            part = cols[: stop - start]
            if fill:
                part.copy_(x[start:stop])
            yield start, stop, part.view(stop - start, -1, k)

    def _conv_patches(self, module: nn.Conv2d, a: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        """Per-example weight gradients [B, kh*kw*C, O] as batched GEMMs over patch matrices.

        Computed as P^T g^T, so the result has layout [B, kh, kw, C, O] (channels-last
        patches, output channels last: 3% faster per DP-SGD epoch of the cnn than g P, in two
        A/B runs); ``finish`` and ``per_example`` undo it.
        """
        kh, kw = module.kernel_size
        out = self._buffer("weight", (a.shape[0], kh * kw * a.shape[1], g2.shape[1]), a)
        for start, stop, patches in self._patch_chunks(module, a):
            torch.bmm(patches.transpose(1, 2), g2[start:stop].transpose(1, 2), out=out[start:stop])
        self.conv_layout = "patches_by_output"
        return out

    def _conv_shifted(self, module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example weight gradients [B, kh*kw*C, O] from patches copied in long runs.

        The padded input is split into its stride phases: plane (p, q, c) holds pixels
        (s_h r + p, s_w u + q) of channel c, row-major with ``wq`` columns. Kernel tap (i, j) of
        every output position (y, x) then reads plane (i mod s_h, j mod s_w, c) at
        ``(y + i // s_h) wq + x + j // s_w``: for a fixed tap, all positions of a row-major
        ``Ho x wq`` grid are one contiguous run of the plane. Patch rows are therefore copied
        as whole runs (``Ho wq`` floats) rather than ``kw C``-float pieces. The grid has
        ``wq - Wo`` extra columns per row, whose patch values are junk (other pixels of the
        same or the next example, or zeros) and whose output gradients are zero, so they add
        nothing to the product. (A non-finite pixel in the next example can therefore make
        this one's gradient NaN; such a lot's clipped sum is NaN either way.)
        Same result as ``_conv_patches``, layout [B, kh, kw, C, O].
        """
        b, o, ho, wo = g.shape
        wq = _phase_shape(module, a)[1]
        lp = ho * wq
        # Output gradients on the Ho x wq grid; the extra columns stay zero.
        if _channels_last_only(g):
            grid = self._buffer("grid", (b, ho, wq, o), g, zeroed=True, region=(wo,))
            grid[:, :, :wo].copy_(g.permute(0, 2, 3, 1))
            rhs = grid.view(b, lp, o)
        else:
            grid = self._buffer("grid", (b, o, ho, wq), g, zeroed=True, region=(wo,))
            grid[:, :, :, :wo].copy_(g)
            rhs = grid.view(b, o, lp).transpose(1, 2)
        kh, kw = module.kernel_size
        out = self._buffer("weight", (b, kh * kw * a.shape[1], o), a)
        for start, stop, patches in self._shifted_chunks(module, a, ho):
            torch.bmm(patches, rhs[start:stop], out=out[start:stop])
        self.conv_layout = "patches_by_output"
        return out

    def _shifted_chunks(
        self, module: nn.Conv2d, a: torch.Tensor, ho: int, fill: bool = True
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Shifted-window patch matrices [c, kh*kw*C, Ho*wq] of consecutive chunks of examples.

        Like :meth:`_patch_chunks` (``fill=False`` only for timing ablations).
        """
        (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
        b, c, h, w = a.shape
        hq, wq = _phase_shape(module, a)
        plane, lp, k = hq * wq, ho * wq, kh * kw * c
        # Planes of every example, plus one spare block that the last runs may read past the
        # end. The padding border is zero from the allocation and never written.
        planes = self._buffer("planes", (b + 1, sh, sw, c, hq, wq), a, zeroed=True, region=(h, w))
        for p in range(sh):
            r0 = max(0, -(-(ph - p) // sh))  # first plane row that holds an input row
            y0 = sh * r0 + p - ph
            for q in range(sw):
                u0 = max(0, -(-(pw - q) // sw))
                x0 = sw * u0 + q - pw
                src = a[:, :, y0::sh, x0::sw]
                planes[:b, p, q, :, r0 : r0 + src.shape[2], u0 : u0 + src.shape[3]].copy_(src)
        chunk, ranges = _chunks(b, k * lp * a.element_size())
        cols = self._buffer("cols", (chunk, kh, kw, c, lp), a)
        block = planes[0].numel()
        for start, stop in ranges:
            part = cols[: stop - start]
            for p in range(min(sh, kh)):
                for q in range(min(sw, kw)):
                    ni, nj = len(range(p, kh, sh)), len(range(q, kw, sw))
                    runs = planes.as_strided(
                        (stop - start, ni, nj, c, lp),
                        (block, wq, 1, plane, 1),
                        planes.storage_offset() + start * block + (p * sw + q) * c * plane,
                    )
                    if fill:
                        part[:, p::sh, q::sw].copy_(runs)
            yield start, stop, part.view(-1, k, lp)

    def _conv_grouped(self, module: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-example weight gradients as one grouped convolution backward (groups = B).

        Folding the batch into channels makes example b's gradient the weight gradient of
        group b; the convolution library computes all B of them in one call.
        """
        b, c, h, w = a.shape
        o = g.shape[1]
        weight = self._buffer("grouped_weight", (b * o, c, *module.kernel_size), a)
        grads = torch.ops.aten.convolution_backward(
            g.reshape(1, b * o, *g.shape[2:]),
            a.reshape(1, b * c, h, w),
            weight,
            None,
            module.stride,
            module.padding,
            module.dilation,
            False,
            [0, 0],
            b,
            [False, True, False],
        )[1]
        self.conv_layout = "standard"
        return grads.view(b, o, -1)

    def _group_norm(self, module: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> None:
        dims = tuple(range(2, a.dim()))
        if self._wants("weight"):
            x_hat = F.group_norm(a, module.num_groups, None, None, module.eps)
            self._add("weight", (g * x_hat).sum(dims))
        if self._wants("bias"):
            self._add("bias", g.sum(dims))

    def per_example(self) -> dict[str, torch.Tensor]:
        """Every per-example gradient of this layer, shaped [B, *param.shape]."""
        out: dict[str, torch.Tensor] = {}
        if self.linear is not None:
            a, g = self.linear
            out["weight"] = torch.bmm(g.unsqueeze(2), a.unsqueeze(1))
        for name, t in self.parts.items():
            out[name] = self._param_layout(name, t, batched=True)
        return out

    def _param_layout(self, name: str, t: torch.Tensor, *, batched: bool) -> torch.Tensor:
        """``t`` (per example [B, ...] when ``batched``, else summed) in the parameter's shape."""
        shape = getattr(self.module, name).shape
        lead = (-1,) if batched else ()
        if name == "weight" and self.conv_layout == "patches_by_output":
            o, c, kh, kw = shape
            t = t.view(*lead, kh, kw, c, o)
            t = t.permute(*range(len(lead)), *(len(lead) + d for d in (3, 2, 0, 1)))
        return t.reshape(*lead, *shape)

    def finish(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum over the batch of the per-example gradients scaled by clip factors ``f``."""
        out: dict[str, torch.Tensor] = {}
        if self.linear is not None:
            a, g = self.linear
            out["weight"] = (g * f[:, None]).T @ a
        for name, t in self.parts.items():
            out[name] = self._param_layout(name, f @ t.flatten(1), batched=False)
        return out


def ghost_rules(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, workspace: Workspace
) -> tuple[list[LayerRule], float]:
    """One hooked forward pass and one backward pass to the layers' outputs -> layer rules."""
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        records.append((module, inputs[0].detach(), output))

    layers = [
        m
        for m in model.modules()
        if isinstance(m, GHOST_TYPES) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            out_grads = torch.autograd.grad(loss, [r[2] for r in records])
    finally:
        for h in handles:
            h.remove()
    seen: dict[nn.Module, int] = {}
    rules = []
    for (m, a, _), g in zip(records, out_grads, strict=True):
        rules.append(LayerRule(m, a, g, workspace, seen.get(m, 0)))
        seen[m] = seen.get(m, 0) + 1
    return rules, float(loss.detach())

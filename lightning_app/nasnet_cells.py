"""NASNet normal cells written into their output, for the inference engine's eager CPU path.

timm's ``NormalCell`` and ``FirstCell`` (Keras's ``_normal_a_cell``) end ``torch.cat([x_left, comb_0, ..., comb_4],
1)``: each ``comb_k`` is an add written to a new tensor, and the concatenation copies all six once more.
:class:`BufferedCell` computes the same branches, then writes ``x_left`` and each add straight into its channel slice
of the output (``torch.add(..., out=slice)``): no concatenation, no intermediate sums. Bit-identical. It runs the
cell itself where gradients are wanted (the attacks), in training mode and under ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.nasnet import FirstCell, NormalCell
from torch import Tensor

from lightning_app.layout import empty_in_layout_of
from lightning_app.module_swap import Replaced, replace_modules


class BufferedCell(nn.Module):
    """A timm ``NormalCell`` / ``FirstCell`` (kept as ``cell``, same parameters) whose output is written in place:
    ``(x, x_prev)`` -> ``[B, C_left + sum(C_k), H, W]`` in ``x_left``'s memory format, equal to ``cell(x, x_prev)``."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.first = isinstance(cell, FirstCell)
        self.train(cell.training)

    def forward(self, x: Tensor, x_prev: Tensor) -> Tensor:
        c = self.cell
        if self.training or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or x_prev.requires_grad or any(p.requires_grad for p in c.parameters()))):
            return c(x, x_prev)
        if self.first:
            x_relu = c.act(x_prev)
            x_left = c.final_path_bn(torch.cat([c.path_1(x_relu), c.path_2(x_relu)], 1))
        else:
            x_left = c.conv_prev_1x1(x_prev)
        x_right = c.conv_1x1(x)
        sums = [(c.comb_iter_0_left(x_right), c.comb_iter_0_right(x_left)),
                (c.comb_iter_1_left(x_left), c.comb_iter_1_right(x_left)),
                (c.comb_iter_2_left(x_right), x_left),
                (c.comb_iter_3_left(x_left), c.comb_iter_3_right(x_left)),
                (c.comb_iter_4_left(x_right), x_right)]
        widths = [x_left.shape[1]] + [a.shape[1] for a, _ in sums]
        out = empty_in_layout_of(x_left, (x_left.shape[0], sum(widths), *x_left.shape[2:]))
        out[:, :widths[0]].copy_(x_left)
        start = widths[0]
        for (a, b), width in zip(sums, widths[1:]):
            torch.add(a, b, out=out[:, start:start + width])
            start += width
        return out


def _is_cell(m: nn.Module) -> bool:
    return type(m) in (NormalCell, FirstCell)


@torch.no_grad()
def replace_cells(net: nn.Module) -> Replaced:
    """In ``net`` (in place): every timm ``NormalCell`` / ``FirstCell`` becomes a :class:`BufferedCell`. Returns what
    was replaced (:func:`~lightning_app.module_swap.restore_modules` puts it back)."""
    def replacement(name: str, m: nn.Module) -> Optional[nn.Module]:
        return BufferedCell(m) if _is_cell(m) else None

    return replace_modules(net, replacement)


__all__ = ["BufferedCell", "replace_cells"]

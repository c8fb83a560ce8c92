"""Replacing submodules of a network in place, and putting them back (the engine's restructurings of its copy)."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch.nn as nn

#: ``(name, original module)`` pairs of a replacement, in the order they were made
Replaced = List[Tuple[str, nn.Module]]


def replace_modules(net: nn.Module, replacement: Callable[[str, nn.Module], Optional[nn.Module]]) -> Replaced:
    """Every submodule of ``net`` (not ``net`` itself, nor anything inside a module already replaced) for which
    ``replacement(name, module)`` returns a module is replaced by it, in place. Returns what was replaced."""
    replaced: Replaced = []
    for name, module in list(net.named_modules()):
        if not name or any(name.startswith(done + ".") for done, _ in replaced):
            continue
        new = replacement(name, module)
        if new is not None:
            net.set_submodule(name, new)
            replaced.append((name, module))
    return replaced


def restore_modules(net: nn.Module, replaced: Replaced) -> None:
    """Undo :func:`replace_modules` (or several of them, their lists concatenated in order)."""
    for name, module in reversed(replaced):
        net.set_submodule(name, module)


__all__ = ["Replaced", "replace_modules", "restore_modules"]

"""One walk over a model's modules, with each module's parent, for injection and lookups.

`nn.Module.named_modules` yields names only, so replacing a module means looking its parent
up again by name; and it descends into every LoRA layer's own seven small modules. `walk`
yields the same modules in the same order (pre-order, each module once) together with the
parent and attribute that hold them, and does not enter the module types it is told to stop at.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn


class Node(NamedTuple):
    """A module found by `walk`: its dotted name, itself, and where it hangs (None for the root)."""

    name: str
    module: nn.Module
    parent: nn.Module | None
    attr: str


def walk(model: nn.Module, stop: tuple[type, ...] = ()) -> list[Node]:
    """Every module of `model` in `named_modules()` order (each module once, the first place it
    appears), without the insides of modules of the `stop` types."""
    nodes: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple] = [("", model, None, "")]  # plain tuples: this loop is hot on deep models
    while stack:
        node = stack.pop()
        module = node[1]
        if id(module) in seen:
            continue
        seen.add(id(module))
        nodes.append(Node._make(node))
        if stop and isinstance(module, stop):
            continue
        prefix = node[0] + "." if node[0] else ""
        children = [(prefix + key, child, module, key) for key, child in module._modules.items() if child is not None]
        children.reverse()
        stack.extend(children)
    return nodes


def replace_child(parent: nn.Module, attr: str, new: nn.Module) -> None:
    """``setattr(parent, attr, new)`` for an attribute that already holds a submodule."""
    hooks = nn.modules.module._global_module_registration_hooks
    if attr in parent._modules and not hooks:
        parent._modules[attr] = new  # where nn.Module.__setattr__ puts a module, without its checks
    else:
        setattr(parent, attr, new)

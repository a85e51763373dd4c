"""The methods by name: the built-in ones, those of installed plug-in packages, and any registered here.

A plug-in is one module defining an :class:`~vitexplain.methods.base.Explainer` subclass decorated with
:func:`register_method`. Built-in methods are listed in :data:`BUILTIN`; an installed package adds its
own through the entry-point group ``vitexplain.methods`` (each entry names a module, or the class
itself), e.g. in its ``pyproject.toml``::

    [project.entry-points."vitexplain.methods"]
    my-method = "my_package.my_method"

Nothing is imported until a method is asked for, and the declarations import no torch.
"""
from __future__ import annotations

import difflib
import re
from importlib import import_module

from .base import NEEDS, Explainer

BUILTIN = ("vitexplain.methods.rollout", "vitexplain.methods.grad_rollout", "vitexplain.methods.flow",
           "vitexplain.methods.grad_attention", "vitexplain.methods.chefer", "vitexplain.methods.legrad",
           "vitexplain.methods.lrp")
ENTRY_POINT_GROUP = "vitexplain.methods"
# options every command has, and the other arguments of Request.create and prepare: no method parameter may
# take one of these names
RESERVED = frozenset({
    "inputs", "out", "model", "checkpoint", "classes", "batch_size", "device", "num_workers", "colormap", "alpha",
    "save_raw", "stretch", "max_side", "image_format", "overwrite", "profile", "amp", "method", "ratios", "fps",
    "gif", "grid", "help", "version", "render", "param_label", "pretrained", "methods", "metrics", "steps",
    "baseline", "seed", "shared", "shard", "engine", "ray_address", "ray_workers", "cpus_per_worker", "ray_logs", "labels",
    "boxes", "masks",
    "gpus_per_worker", "part",
})
RESERVED_NAMES = frozenset({"sweep", "evaluate", "compact", "random"})  # the other subcommands, and evaluate's baseline row
NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

_registry: dict[str, type[Explainer]] = {}
_discovered = False


def register_method(method: type[Explainer]) -> type[Explainer]:
    """Class decorator: check ``method``'s declaration and make it available by its ``name``."""
    problem = declaration_problem(method)
    if problem:
        raise TypeError(f"cannot register {method.__qualname__}: {problem}")
    existing = _registry.get(method.name)
    if existing is not None and existing.__qualname__ != method.__qualname__:
        raise TypeError(f"cannot register {method.__qualname__}: the name {method.name!r} is {existing.__qualname__}'s")
    _registry[method.name] = method
    return method


def declaration_problem(method: type[Explainer]) -> str | None:
    """What is wrong with ``method``'s declaration, or ``None``."""
    if not (isinstance(method, type) and issubclass(method, Explainer)):
        return "a method is a subclass of vitexplain.methods.base.Explainer"
    if not NAME.fullmatch(method.name or ""):
        return f"name {method.name!r} must be lower-case words joined by '-' (it becomes a subcommand)"
    if method.name in RESERVED_NAMES:
        return f"name {method.name!r} is taken by the command line"
    if not method.summary:
        return "give it a one-line summary"
    if not method.needs <= NEEDS or "attentions" not in method.needs:
        return f"needs must include 'attentions' and be among {sorted(NEEDS)}"
    if method.class_specific != ("gradients" in method.needs):
        return "a class-specific method needs gradients, and only such a method does"
    names = [p.name for p in method.params]
    if len(set(names)) != len(names):
        return "two parameters share a name"
    for param in method.params:
        if not param.name.isidentifier() or param.name in RESERVED:
            return f"parameter name {param.name!r} is not an identifier or clashes with a common option"
        try:
            param.parse(param.default)
        except ValueError as error:
            return f"the default fails its own check ({error})"
    return None


def discover() -> None:
    """Import the built-in method modules and the installed plug-ins (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in BUILTIN:
        import_module(module)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()
        if isinstance(loaded, type):
            register_method(loaded)


def available_methods() -> dict[str, type[Explainer]]:
    """Every method by name, built-in ones first."""
    discover()
    order = {module: index for index, module in enumerate(BUILTIN)}
    names = sorted(_registry, key=lambda name: order.get(_registry[name].__module__, len(order)))  # stable
    return {name: _registry[name] for name in names}


def get_method(name: str) -> type[Explainer]:
    """The method called ``name``; ``ValueError`` with the closest names if there is none."""
    methods = available_methods()
    if name in methods:
        return methods[name]
    close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown method {name!r}; available: {', '.join(methods)}.{hint}")


def unregister_method(name: str) -> None:
    """Forget the method called ``name`` (for plug-ins registered for a while, as in tests)."""
    _registry.pop(name, None)

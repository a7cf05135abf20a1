"""Regularizers added to DSM: one module each, listed here; a user's own enters through ``--plugin``.

Built-ins (:data:`BUILTINS`, in this order): ``fpe`` (the score-FPE residual, FP-Diffusion),
``conservative`` (‖J − Jᵀ‖², Chao et al.), ``hodsm`` (high-order DSM, Lu et al.). The interface is
:class:`fpe_lab.regularizers.base.Regularizer`.

The one door for a regularizer outside the package: :func:`load_plugin` ("--plugin MODULE" on the
command line, ``plugins`` in ``config.json``) imports MODULE from ``sys.path`` and adds every
``Regularizer`` subclass *defined* in it as a ``--reg`` choice by its ``name``. Nothing registers itself
on import: the available set is the built-ins plus the plug-ins loaded explicitly.
Recipes: docs/extending.md.
"""

from __future__ import annotations

import importlib
import inspect

from fpe_lab.regularizers.base import Regularizer
from fpe_lab.regularizers.conservative import ConservativeRegularizer
from fpe_lab.regularizers.fpe import FPERegularizer
from fpe_lab.regularizers.hodsm import HODSMRegularizer

__all__ = ["BUILTINS", "NONE", "Regularizer", "available", "get", "load_plugin"]

BUILTINS: tuple[type[Regularizer], ...] = (FPERegularizer, ConservativeRegularizer, HODSMRegularizer)
"""The regularizers that ship with fpe_lab."""

NONE = "none"
"""The ``--reg`` value of plain DSM (no regularizer, lam = 0)."""

_plugins: dict[str, type[Regularizer]] = {}
_modules: dict[str, list[type[Regularizer]]] = {}


def available() -> dict[str, type[Regularizer]]:
    """Name → class: the built-ins, then the loaded plug-ins."""
    return {**{cls.name: cls for cls in BUILTINS}, **_plugins}


def get(name: str) -> type[Regularizer]:
    """The regularizer called ``name``; ValueError listing the choices (and the door for others)."""
    found = available().get(name)
    if found is None:
        raise ValueError(f"reg must be one of {[NONE, *available()]} (a regularizer of your own enters with "
                         f"--plugin MODULE); got {name!r}")
    return found


def load_plugin(module: str) -> list[type[Regularizer]]:
    """Import ``module`` from ``sys.path`` and make each ``Regularizer`` subclass defined in it available by its
    ``name``; returns those classes. Loading the same module again is a no-op. ValueError when the module
    cannot be imported, defines no regularizer, or a name is taken by another class."""
    if not isinstance(module, str) or not module or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"plugin must be a module name such as my_regularizer or pkg.mod; got {module!r}")
    if module in _modules:
        return _modules[module]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"plugin {module}: cannot import it ({e}); is its folder on sys.path (PYTHONPATH)?") from None
    found = [obj for _, obj in inspect.getmembers(mod, inspect.isclass)
             if issubclass(obj, Regularizer) and obj.__module__ == mod.__name__ and not inspect.isabstract(obj)]
    if not found:
        raise ValueError(f"plugin {module} defines no subclass of fpe_lab.regularizers.base.Regularizer")
    taken = available()
    for cls in found:
        other = taken.get(cls.name)
        if cls.name == NONE or (other is not None and other is not cls):
            what = "plain DSM" if cls.name == NONE else f"{other.__module__}.{other.__qualname__}"  # type: ignore[union-attr]
            raise ValueError(f"plugin {module}: regularizer name {cls.name!r} of {cls.__qualname__} is taken by "
                             f"{what}; set a class attribute name = '...'")
        taken[cls.name] = cls
    for cls in found:
        _plugins[cls.name] = cls
    _modules[module] = found
    return found

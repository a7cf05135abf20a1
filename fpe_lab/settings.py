"""Configuration sections: frozen dataclasses whose fields carry their flag, help text and hash role.

A :class:`Section` is a frozen dataclass of settings. Each field is declared with :func:`setting`
(default, help, flag, whether it enters the run fingerprint) or :func:`section` (a nested section);
the command line is generated from that metadata (:mod:`fpe_lab.commands.train`), and a section
round-trips through JSON (:meth:`Section.to_dict` / :meth:`Section.from_dict`). The run
configuration (:mod:`fpe_lab.config`) and every regularizer's ``Options`` (:mod:`fpe_lab.regularizers`)
are sections, so a regularizer's options become flags and a ``config.json`` section without parser code.

JSON values are type-checked when read: a boolean field takes ``true``/``false`` only (``"false"`` is
refused, not read as true), an integer field takes integers only, a float field numbers but not
booleans, and a string field strings.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import field
from typing import Any

__all__ = ["Section", "setting", "section", "strip_optional", "plain"]


def setting(default: Any, help: str, flag: str | None = None, in_hash: bool = True, repeat: bool = False) -> Any:
    """A section field: its default, help text, command-line flag (default: the field name with dashes),
    whether it enters the run fingerprint (settings that cannot change the trained weights do not), and
    whether the flag is repeated once per value (``--plugin A --plugin B``) rather than taking a list."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed")
    return field(default=default, metadata={"help": help, "flag": flag, "in_hash": in_hash, "repeat": repeat})


def section(cls: type, help: str) -> Any:
    """A nested section field with the default instance of ``cls``."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


def plain(v: Any) -> Any:
    """A JSON-able value: sections become dicts, enums their values, tuples lists."""
    if isinstance(v, Section):
        return v.to_dict()
    if isinstance(v, enum.Enum):
        return v.value
    return list(v) if isinstance(v, tuple) else v


def strip_optional(kind: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of ``X | None``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(kind))
    return kind, False


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, evaluated once per class: the annotations are strings (``from __future__
    import annotations``), and evaluating them on every section construction took about half of a CLI
    call's time after imports (parser built, configuration validated). Callers must not modify the dict."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _type_error(path: str, want: str, v: Any) -> ValueError:
    return ValueError(f"{path} must be {want}; got {v!r} ({type(v).__name__})")


def convert(kind: Any, v: Any, path: str) -> Any:
    """A JSON value → the field's type (enum from value, tuple from list, nested section from dict),
    refusing values of the wrong JSON type with a message naming the path."""
    inner, optional = strip_optional(kind)
    if v is None:
        if optional:
            return None
        raise ValueError(f"{path} must not be null")
    if isinstance(inner, type) and issubclass(inner, Section):
        return inner.from_dict(v, path)
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        if isinstance(v, inner):
            return v
        try:
            return inner(v)
        except ValueError:
            raise ValueError(f"{path} must be one of {[m.value for m in inner]}; got {v!r}") from None
    if typing.get_origin(inner) is tuple:
        if not isinstance(v, (list, tuple)):
            raise _type_error(path, "a list", v)
        (item, *_) = typing.get_args(inner)
        return tuple(convert(item, x, f"{path}[{i}]") for i, x in enumerate(v))
    if inner is bool:
        if not isinstance(v, bool):
            raise _type_error(path, "true or false", v)
        return v
    if inner is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _type_error(path, "an integer", v)
        return v
    if inner is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _type_error(path, "a number", v)
        return float(v)
    if inner is str and not isinstance(v, str):
        raise _type_error(path, "a string", v)
    return v


class Section:
    """JSON round trip and enum checks for the frozen configuration sections."""

    def _check_enums(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            kind, optional = strip_optional(hints[f.name])
            v = getattr(self, f.name)
            if v is None and optional:
                continue
            if isinstance(kind, type) and issubclass(kind, enum.Enum) and not isinstance(v, kind):
                raise ValueError(f"{f.name} must be one of {[m.value for m in kind]}; got {v!r}")
            if isinstance(kind, type) and issubclass(kind, Section) and not isinstance(v, kind):
                raise ValueError(f"{f.name} must be a {kind.__name__}; got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: enums become their values, tuples lists, sections dicts."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> Any:
        """Inverse of :meth:`to_dict`. Unknown keys are an error; missing keys take the defaults."""
        where = path or "config"
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object; got {type(d).__name__}")
        hints = _hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(repr(f'{path}.{k}' if path else k) for k in unknown)} in "
                             f"{where}; allowed: {names}")
        kwargs = {k: convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def hashed(self) -> dict[str, Any]:
        """The fields that enter the fingerprint (``in_hash``), nested sections by their own ``hashed``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("in_hash", True):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.hashed() if isinstance(v, Section) else plain(v)
        return out

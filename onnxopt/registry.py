"""The pass registry: one explicit, ordered table of name -> pass class, plus families.

The table itself lives in the pass library (``onnxopt.passes.PASSES`` and
``onnxopt.passes.FAMILIES``); the core only knows how to look things up in it.
"""

from __future__ import annotations

import difflib
import functools

from .errors import UsageError
from .pass_base import Pass


class Registry:
    def __init__(self, passes: list[type[Pass]], families: dict[str, list[str]] | None = None,
                 dispatch: dict[str, tuple[str, str, dict[str, str]]] | None = None):
        self._passes: dict[str, type[Pass]] = {}
        for cls in passes:
            self.register(cls)
        self._families: dict[str, list[str]] = {}
        for family, members in (families or {}).items():
            self.add_family(family, members)
        self._dispatch: dict[str, tuple[str, str, dict[str, str]]] = {}
        for name, (key, default, targets) in (dispatch or {}).items():
            self.add_dispatch(name, key, default, targets)

    def register(self, cls: type[Pass]) -> None:
        if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
            raise ValueError(f"pass class {cls.__name__} needs a kebab-case name")
        if cls.name in self._passes:
            raise ValueError(f"pass name '{cls.name}' is registered twice")
        self._passes[cls.name] = cls

    def add_family(self, family: str, members: list[str]) -> None:
        if family in self._passes:
            raise ValueError(f"family '{family}' clashes with a pass of that name")
        missing = [m for m in members if m.split(":", 1)[0] not in self._passes]
        if missing:
            raise ValueError(f"family '{family}' names unknown passes: {missing}")
        self._families[family] = list(members)

    def add_dispatch(self, name: str, key: str, default: str, targets: dict[str, str]) -> None:
        """``name:key=V,...`` resolves to pass ``targets[V]`` with the remaining options."""
        if name in self._passes or name in self._families:
            raise ValueError(f"dispatch name '{name}' clashes with a pass or family")
        unknown = [t for t in targets.values() if t not in self._passes]
        if unknown or default not in targets:
            raise ValueError(f"dispatch '{name}' names unknown passes or default: {unknown or default}")
        self._dispatch[name] = (key, default, dict(targets))

    def dispatch_names(self) -> list[str]:
        return list(self._dispatch)

    def dispatch(self, name: str) -> tuple[str, str, dict[str, str]] | None:
        return self._dispatch.get(name)

    def names(self) -> list[str]:
        return list(self._passes)

    def families(self) -> dict[str, list[str]]:
        return dict(self._families)

    def is_family(self, name: str) -> bool:
        return name in self._families

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            raise UsageError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        known = self.names() + list(self._families) + list(self._dispatch)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown pass '{name}'{hint}; valid passes: {', '.join(known)}"

    def check_known(self, name: str) -> None:
        if name not in self._passes and name not in self._families and name not in self._dispatch:
            raise UsageError(self._unknown_message(name))


@functools.cache
def default_registry() -> Registry:
    """The registry of the bundled pass library (imported on first use, not at import time)."""
    from onnxopt import passes as library

    return Registry(list(library.PASSES), dict(library.FAMILIES), dict(getattr(library, "DISPATCH", {})))

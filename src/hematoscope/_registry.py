"""Name → object registries (bundle kinds, OOD scorers, dataset readers), written once.

Each registry is a :class:`Registry`: a decorator registers a class or function under a name
(a second, different object under the same name is an error, never a silent overwrite), a
lookup raises the registry's own error listing the known names, and entries defined in modules
that are imported only when needed (so that ``hematoscope --help`` stays light) are listed in
``lazy`` (name → module) and imported on first lookup.

    >>> KINDS = Registry("bundle kind", error=ValueError)
    >>> @KINDS.register("toy", kind="toy")
    ... class Toy: ...
    >>> KINDS.get("toy") is Toy, Toy.kind, KINDS.names()
    (True, 'toy', ['toy'])
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered by name.

    Args:
        what: what an entry is, for messages (``"OOD method"``, ``"reader"`` ...).
        error: exception class raised for an unknown or a duplicate name.
        lazy: name → module that registers that name when imported.
    """

    def __init__(self, what: str, *, error: type[Exception] = KeyError, lazy: Mapping[str, str] | None = None):
        self.what = what
        self.error = error
        self._lazy = dict(lazy or {})
        self._entries: dict[str, T] = {}

    def register(self, name: str, /, **attrs) -> Callable[[T], T]:
        """Decorator: register the object under ``name`` after setting ``attrs`` on it.

        Registering the same object again is allowed (a module imported twice under different
        names); another object under a taken name raises ``error``.
        """

        def deco(obj: T) -> T:
            known = self._entries.get(name)
            if known is not None and known is not obj:
                raise self.error(f"{self.what} {name!r} is already registered by "
                                 f"{getattr(known, '__qualname__', known)!s}")
            for key, value in attrs.items():
                setattr(obj, key, value)
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered under ``name`` (importing its module first when it is lazy).

        Raises:
            error: no such name.
        """
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None

    def load_all(self) -> None:
        """Import every lazy module (e.g. before trying each entry in turn)."""
        for module in dict.fromkeys(self._lazy.values()):
            importlib.import_module(module)

    def names(self) -> list[str]:
        """Every registered or lazily available name, sorted."""
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

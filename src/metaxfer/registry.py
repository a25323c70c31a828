"""A tiny name -> factory registry, shared by backbones, learners and datasets."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from metaxfer.errors import ConfigError

T = TypeVar("T")


class UnknownArgumentError(ConfigError):
    """A registered factory was given a keyword argument it does not take."""


class Registry(Generic[T]):
    """Maps names to factories. ``kind`` appears in error messages ("backbone", "learner", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``factory`` under ``name``."""

        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pick another name")
            self._factories[name] = factory
            return factory

        return wrap

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``.

        Raises:
            ConfigError: listing the registered names when ``name`` is unknown.
        """
        try:
            return self._factories[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._factories))}") from None

    def parameters(self, name: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any]] | None:
        """The keyword parameters the object ``name`` takes, with their resolved annotations; ``None`` if unknowable.

        Factories often forward ``**kwargs`` to a class (``conv4(**kwargs) -> Conv4``): the class of the
        return annotation then has the real signature.

        Returns:
            ``({name: inspect.Parameter}, {name: annotation})``, or ``None`` for a factory that takes
            ``**kwargs`` without an annotated class to look through.
        """
        target: Any = self.get(name)
        for _ in range(2):
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                return None
            try:
                hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
            except (NameError, TypeError, AttributeError):
                hints = {}  # annotations that do not resolve: the names are still known, the kinds are not
            params = signature.parameters.values()
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                keywords = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                return {p.name: p for p in params if p.kind in keywords}, hints
            target = hints.get("return")
            if not isinstance(target, type):
                return None
        return None

    def arguments(self, name: str) -> list[str] | None:
        """The names of the keyword arguments ``name`` takes (see :meth:`parameters`), or ``None`` if unknowable."""
        found = self.parameters(name)
        return None if found is None else list(found[0])

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the object registered under ``name`` with ``kwargs``.

        Raises:
            ConfigError: for an unknown name (listing the registered ones).
            UnknownArgumentError: for an argument the object does not take, rather than Python's
                TypeError from somewhere inside the factory.
        """
        factory = self.get(name)
        try:
            return factory(**kwargs)
        except TypeError as e:
            # Factories are often thin wrappers passing **kwargs on, so the check happens here, on the
            # error Python raises for the constructor, and only for a name the caller actually passed.
            bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if bad is None or bad.group(1) not in kwargs:
                raise
            takes = self.arguments(name)
            raise UnknownArgumentError(
                f"{self.kind} {name!r} takes no argument {bad.group(1)!r}" + (f"; it takes: {', '.join(takes)}" if takes else "")
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

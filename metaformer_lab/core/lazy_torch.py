"""torch for the op files, imported when a module is first made rather than when a spec is read.

An op is one file: its config, its shape rule and its ``nn.Module`` (see ``docs/architecture.md``). Checking a
spec (``validate``, ``space size``, a search's screening) runs configs and shape rules only, and importing torch
costs 1.5-2 s on a small machine, so the op files take their torch names from here::

    from metaformer_lab.core.lazy_torch import F, Tensor, nn, torch

and are written as plain PyTorch (``class Pooling(nn.Module): ...``). Where torch is already imported when an op
file is read (every process that has built a module, the tests, a notebook), these *are* ``torch``, ``torch.nn``,
``torch.nn.functional`` and ``torch.Tensor``, and nothing below happens.

Where it is not, they are stand-ins. A class statement on a stand-in base (``nn.Module``, ``nn.Linear``, or
another such class) records the class instead of making it. The first use of any stand-in for anything else (a
call, an ``isinstance``, an attribute) runs :func:`load`: it imports torch, makes the recorded classes (with
their real bases, in the order they were written) and puts the real modules and classes in place of every
stand-in in the package's module globals. Code that runs after that (``forward``, ``torch.compile``, fx,
pickling) sees plain torch. A stand-in kept somewhere else (a tuple of classes) still answers through the real
object.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names are, for type checkers and readers
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

__all__ = ["F", "Tensor", "load", "nn", "torch", "torch_imported"]

_MODULES = {"torch": "torch", "nn": "torch.nn", "F": "torch.nn.functional"}
_CLASSES = {"Tensor": ("torch", "Tensor")}
_PACKAGE = __name__.split(".")[0]
_loaded = False
_recorded: list[_RecordedClass] = []
_lock = threading.RLock()  # one thread makes the classes; another that needs one waits for it


def torch_imported() -> bool:
    """Whether torch is in this process already (imported by anyone)."""
    return _loaded or "torch" in sys.modules


def load() -> None:
    """Import torch, make the recorded classes and replace every stand-in in the package's modules."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        importlib.import_module("torch.nn.functional")
        _loaded = True
        for recorded in list(_recorded):
            recorded.real()
        for module in list(sys.modules.values()):
            if type(module) is not types.ModuleType or module.__name__.partition(".")[0] != _PACKAGE:
                continue  # (the type first: reading a lazily loaded module's attribute would load it)
            names = vars(module)
            for name, value in list(names.items()):
                if isinstance(value, _Lazy):
                    names[name] = value.real()


class _Lazy:
    """Something torch will provide; every use but a class statement loads it (see :func:`load`)."""

    def real(self) -> Any:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # protocols Python probes for (copy, pickle, inspect)
            raise AttributeError(name)
        return getattr(self.real(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.real()(*args, **kwargs)

    def __instancecheck__(self, instance: Any) -> bool:
        return torch_imported() and isinstance(instance, self.real())  # no instance exists before torch does

    def __subclasscheck__(self, cls: type) -> bool:
        return torch_imported() and issubclass(cls, self.real())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (_Recorder,)  # a class statement on this base records the class (see _RecorderMeta)


class _Module(_Lazy):
    """A stand-in for ``torch``, ``torch.nn`` or ``torch.nn.functional``."""

    def __init__(self, path: str) -> None:
        self._path = path

    def real(self) -> types.ModuleType:
        load()
        return sys.modules[self._path]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if torch_imported():
            return getattr(self.real(), name)
        return _Attribute(self._path, name)  # a base class, or a value the first use of which loads torch

    def __repr__(self) -> str:
        return f"<stand-in for module {self._path!r}>"


class _Attribute(_Lazy):
    """A stand-in for a name in a torch module (``nn.Module``, ``nn.GroupNorm``, ``torch.Tensor``)."""

    def __init__(self, path: str, name: str) -> None:
        self._path, self._name = path, name

    def real(self) -> Any:
        load()
        return getattr(sys.modules[self._path], self._name)

    def __repr__(self) -> str:
        return f"<stand-in for {self._path}.{self._name}>"


class _RecordedClass(_Lazy):
    """A class written on a stand-in base, made on first use (or by :func:`load`)."""

    def __init__(self, name: str, bases: tuple[Any, ...], namespace: dict[str, Any], kwargs: dict[str, Any]):
        self._name, self._bases, self._namespace, self._kwargs = name, bases, namespace, kwargs
        self._made: type | None = None
        self.__name__, self.__qualname__ = name, namespace["__qualname__"]
        self.__module__, self.__doc__ = namespace["__module__"], namespace.get("__doc__")

    def real(self) -> type:
        if self._made is not None:
            return self._made
        load()
        with _lock:
            if self._made is None:  # load() makes every recorded class; this one may be needed by another first
                self._made = _make(self._name, self._bases, self._namespace, self._kwargs)
                home = sys.modules.get(self._namespace["__module__"])
                if home is not None and vars(home).get(self._name) is self:
                    setattr(home, self._name, self._made)  # pickle finds a class by its module and name
        return self._made

    def __repr__(self) -> str:
        state = "made" if self._made is not None else "not made until torch is imported"
        return f"<class {self._namespace['__module__']}.{self._namespace['__qualname__']} ({state})>"


def _make(name: str, bases: tuple[Any, ...], namespace: dict[str, Any], kwargs: dict[str, Any]) -> type:
    """The class a class statement on stand-in bases meant, on the real bases. ``namespace`` carries the body's
    ``__classcell__``: ``type.__new__`` binds ``super()`` to the class made here."""
    real = tuple(base.real() if isinstance(base, _Lazy) else base for base in bases)
    return types.new_class(name, real, kwargs, lambda ns: ns.update(namespace))


class _RecorderMeta(type):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> Any:
        original = namespace.pop("__orig_bases__", bases)
        if torch_imported():  # loaded since the stand-in base was read: make the class at once
            return _make(name, original, namespace, kwargs)
        recorded = _RecordedClass(name, original, namespace, kwargs)
        _recorded.append(recorded)
        return recorded


_Recorder = type.__new__(_RecorderMeta, "_Recorder", (), {
    "__module__": __name__,
    "__doc__": "What a stand-in base becomes in a class statement (``__mro_entries__``); never a made class's base.",
})


def __getattr__(name: str) -> Any:  # the names an op file imports: real ones where torch is in the process
    if name in _MODULES:
        return importlib.import_module(_MODULES[name]) if torch_imported() else _Module(_MODULES[name])
    if name in _CLASSES:
        path, attr = _CLASSES[name]
        return getattr(importlib.import_module(path), attr) if torch_imported() else _Attribute(path, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The defense registry: every defense family registers itself in its own file, and a user's own
defense comes in as ``package.module:factory``.

``create_defense("jpeg", model, quality=75)`` builds a registered defense;
``create_defense("mypkg.defenses:build", model, strength=2)`` imports ``mypkg.defenses`` and calls
``build(model, **params)``, which must return a :class:`~advface_fast.defenses.base.Defense`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

from torch import nn

from advface_fast.defenses.base import Defense

_REGISTRY: dict[str, Callable[..., Defense]] = {}


def register_defense(name: str, factory: Callable[..., Defense]) -> Callable[..., Defense]:
    """Add a defense family: ``factory(model, **params) -> Defense`` (a Defense subclass will do)."""
    if name in _REGISTRY:
        raise ValueError(f"defense '{name}' is already registered")
    _REGISTRY[name] = factory
    return factory


def list_defenses() -> list[str]:
    return sorted(_REGISTRY)


def resolve_defense(name: str) -> Callable[..., Defense]:
    """The factory of a registered defense, or of a user's ``package.module:factory`` (imported)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"--defense {name}: cannot load {attr!r} from module {module_name!r} ({err})") from None
    else:
        try:
            factory = _REGISTRY[name]
        except KeyError:
            raise KeyError(f"unknown defense '{name}'; available: {', '.join(list_defenses())}, "
                           "or package.module:factory for your own") from None
    return factory


def create_defense(name: str, model: nn.Module, **params) -> Defense:
    """A registered defense by name, or a user's by ``package.module:factory``."""
    factory = resolve_defense(name)
    try:
        defense = factory(model, **params)
    except TypeError as err:  # a misspelt or unknown parameter: one line, not a traceback
        raise ValueError(f"defense '{name}' with {params}: {err}") from None
    if not isinstance(defense, Defense):
        raise ValueError(f"defense '{name}' built a {type(defense).__name__}, not an advface_fast.defenses.Defense")
    return defense


def parse_defense(spec: str) -> tuple[str, dict]:
    """``"jpeg:quality=75"`` -> ("jpeg", {"quality": 75}); ``"pkg.mod:factory:k=v"`` -> ("pkg.mod:factory",
    {"k": v}); values are JSON where they parse (numbers, true/false), else strings; ``a|b`` is a tuple."""
    head, _, tail = spec.rpartition(":")
    if not head or "=" not in tail:
        return spec.strip(), {}
    params = {}
    for item in tail.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad defense parameters {tail!r} in {spec!r}; use e.g. jpeg:quality=75,name=value")
        parts = [_value(v) for v in value.split("|")]
        params[key.strip()] = tuple(parts) if len(parts) > 1 else parts[0]
    return head.strip(), params


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def check_defense(spec: str) -> str:
    """``spec`` if it names a registered defense or a loadable ``package.module:factory`` (parameters
    are checked when it is built); else ValueError, one line."""
    try:
        resolve_defense(parse_defense(spec)[0])
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    return spec


def defense_from_spec(spec: str, model: nn.Module, **run) -> Defense:
    """A defense from a spec string (:func:`parse_defense`) with the run's settings (``seed``,
    ``batch_size``, ...), which the spec may not set."""
    name, params = parse_defense(spec)
    clash = sorted(set(params) & set(run))
    if clash:
        raise ValueError(f"defense {spec}: {', '.join(clash)} come from the run, not the spec")
    check_defense(spec)  # an unknown name: one clear error before the model work
    return create_defense(name, model, **run, **params)


__all__ = ["check_defense", "create_defense", "defense_from_spec", "list_defenses", "parse_defense", "register_defense",
           "resolve_defense"]

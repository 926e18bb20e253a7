"""advface-fast: a fast, honest benchmark of adversarial attacks and defenses on face verification.

``advface_fast.create_model("dlib-resnet")`` builds a registered model, timm-style; the import is
lazy, so ``import advface_fast`` stays light (no torch until a model is asked for).
"""

__version__ = "0.1.0"

_LAZY = {"create_model": "models", "list_models": "models"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", "create_model", "list_models"]

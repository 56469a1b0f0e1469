"""torchao weight-quantization schemes, one file each (the interface is planner.schemes.base.Scheme).

Every module of this package other than `base` is imported here, and each registers its scheme with
@register, so a new scheme is a new file: nothing else lists them. `SCHEMES` maps the `quantize = "..."`
name of a recipe file to the scheme object.
"""

from __future__ import annotations

import importlib
import pkgutil

from planner.schemes.base import REGISTRY, LayerSettings, Scheme, SchemeSettings, TensorLayout, register

SCHEMES: dict[str, Scheme] = REGISTRY  # the registry itself: a scheme registered later is found too


def load_scheme_files() -> None:
    """Import every scheme file of the package (each registers itself), then order the registry by name, so
    listings and error messages do not depend on the order the files happened to import each other in."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    by_name = sorted(REGISTRY.items())
    REGISTRY.clear()
    REGISTRY.update(by_name)


def import_tensor_types() -> None:
    """Import every module that registers a scheme's tensor subclasses, so weights_only loading accepts them."""
    for scheme in SCHEMES.values():
        scheme.import_tensor_types()


load_scheme_files()

__all__ = ["SCHEMES", "LayerSettings", "Scheme", "SchemeSettings", "TensorLayout", "import_tensor_types",
           "load_scheme_files", "register"]

"""Make ``import torchvision`` work when its compiled ops cannot load.

Why this exists: PyPI's ``torchvision`` wheels are CUDA builds, and the
compiled extension ``torchvision/_C.so`` of such a wheel cannot be loaded next
to a CPU-only ``torch`` (``torch==X+cpu``). torchvision tolerates a missing
extension for most of its code, but while importing it registers fake (meta)
kernels with ``torch.library.register_fake("torchvision::nms")`` and a few
others *unconditionally*, and that call fails when the operator was never
declared: ``RuntimeError: operator torchvision::nms does not exist``. The whole
package then fails to import, although the segmentation models use none of
the compiled ops.

What it does: :func:`install` first tries to load the extension itself,
exactly as torchvision would; if that works (a torchvision that matches
torch), nothing else happens. Only if it fails, it reads torchvision's
registration modules (without importing them), finds the operators that get a
fake kernel registered outside an ``if torchvision.extension._has_ops()``
guard, and declares each missing one (schema only, no kernel) in a
``torch.library`` fragment. torchvision then imports; calling one of those ops
would still fail, since no kernel exists, which is what torchvision does
anyway without its extension.

Import this module, or call :func:`install`, before anything imports
torchvision (timm, segmentation_models_pytorch and MONAI may import it).
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["SHIMMED_OPS", "install"]

# The schemas torchvision's C++ extension declares (csrc/ops/*.cpp), for the ops
# whose fake kernels are registered at import time.
KNOWN_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# modules of torchvision that register kernels for its operators at import time
REGISTRATION_MODULES = ("_meta_registrations.py", "_autograd_registrations.py")
REGISTRATION_FUNCTIONS = {"register_fake", "impl_abstract", "register_autograd", "register_kernel"}

#: names of the operators this module declared (empty when nothing was needed)
SHIMMED_OPS: list[str] = []
_fragment: torch.library.Library | None = None  # must stay alive, or the declarations vanish
_done = False


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _extension_loads(package: Path) -> bool:
    suffixes = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd")
    candidates = [package / f"_C{suffix}" for suffix in suffixes]
    for path in candidates:
        if path.is_file():
            try:
                torch.ops.load_library(str(path))
            except (OSError, ImportError, RuntimeError):
                return False
            return True
    return False


def _registered_at_import(source: str) -> list[str]:
    """Operator names ``torchvision::NAME`` passed to a registration call that runs
    whenever the module is imported: top-level statements and decorators of
    top-level functions, not code under an ``if`` (guarded by ``_has_ops()``)."""
    names = []
    tree = ast.parse(source)
    for statement in tree.body:
        if isinstance(statement, ast.If):
            continue
        roots: list[ast.AST] = []
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots = list(statement.decorator_list)
        elif isinstance(statement, (ast.Expr, ast.Assign)):
            roots = [statement.value]  # also register_fake("...")(function)
        calls = [node for root in roots for node in ast.walk(root) if isinstance(node, ast.Call)]
        for call in calls:
            func = call.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called not in REGISTRATION_FUNCTIONS or not call.args:
                continue
            first = call.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                namespace, _, name = first.value.partition("::")
                if namespace == "torchvision" and name:
                    names.append(name)
    return names


def _exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def install() -> list[str]:
    """Declare the torchvision operators that its import needs and that are
    missing; returns their names (empty when torchvision is absent, already
    imported, or its extension loads)."""
    global _fragment, _done
    if _done:
        return SHIMMED_OPS
    _done = True
    package = _package_dir()
    if package is None or "torchvision" in sys.modules or _extension_loads(package):
        return SHIMMED_OPS
    needed: list[str] = []
    for module in REGISTRATION_MODULES:
        path = package / module
        if path.is_file():
            needed += [n for n in _registered_at_import(path.read_text()) if n not in needed]
    missing = [n for n in needed if not _exists(n)]
    if missing:
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            # an op unknown here gets a placeholder schema: register_fake only needs the
            # name to exist, and without a kernel the op cannot run either way
            _fragment.define(KNOWN_SCHEMAS.get(name, f"{name}(Tensor[] args) -> Tensor"))
        SHIMMED_OPS.extend(missing)
    return SHIMMED_OPS


install()

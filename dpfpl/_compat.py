"""Import shims kept in one place.

torchvision on a CPU-only torch
-------------------------------
open_clip imports torchvision (for its transforms). On the CPU machines this project targets, the
only torchvision wheel that matches ``torch==2.13.0`` is a CUDA build whose compiled ops
(``torchvision/_C.so``) cannot load against the CPU torch. torchvision's ``_meta_registrations``
module then fails at import with ``operator torchvision::nms does not exist``.

:func:`ensure_torchvision` first tries to load the compiled ops the normal way. Only when that fails
does it declare the schemas of the two ops the meta registrations look up (``torchvision::nms`` and
``torchvision::qnms``) in a ``FRAGMENT`` library, so that ``import torchvision`` succeeds. The ops
themselves stay unavailable (calling them raises), which is fine: this project uses torchvision's
image transforms only. On a GPU machine with a matching CUDA torch the compiled ops load and the shim
does nothing. See ``../shared/reference/environment.md``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_DONE = False
_FRAGMENT = None  # keep the Library object alive: its definitions vanish when it is collected


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work on CPU-only torch (idempotent; no-op when ops load)."""
    global _DONE, _FRAGMENT
    if _DONE or "torchvision" in sys.modules:
        _DONE = True
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        _DONE = True  # not installed: open_clip's import will raise its own clear error
        return
    lib_path = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(lib_path)
    except (OSError, RuntimeError):
        _FRAGMENT = torch.library.Library("torchvision", "FRAGMENT")
        _FRAGMENT.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _FRAGMENT.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _DONE = True


def import_open_clip():
    """Import open_clip after :func:`ensure_torchvision`; return the module."""
    ensure_torchvision()
    import open_clip

    return open_clip


CONFIG_DIR = __import__("pathlib").Path(__file__).parent / "model_configs"
_REGISTERED = False


def open_clip_with_configs():
    """open_clip (see :func:`import_open_clip`) with the shipped model configs (``model_configs/``) registered."""
    global _REGISTERED
    oc = import_open_clip()
    if not _REGISTERED:
        oc.add_model_config(CONFIG_DIR)
        _REGISTERED = True
    return oc

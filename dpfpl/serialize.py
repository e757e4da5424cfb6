"""Pickle-free serialisation of nested state: tensors in safetensors, everything else in JSON.

Used for everything that crosses a process (Flower messages) and for state read back from disk, so
that no peer or file can run code on load (a full pickle load can).
:func:`pack` accepts dicts (any JSON-able keys: str, int, float, bool, None), lists, tuples (read
back as lists), tensors, Python scalars and strings; :func:`unpack` is its inverse. Tensors are
stored contiguous on the CPU; a tensor's dtype and shape come back exactly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import DpfplError

__all__ = ["pack", "unpack"]

_META = "dpfpl-tree"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__items__" not in obj:
            return {k: _encode(v, tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"cannot serialise a dict key of type {type(k).__name__}")
        return {"__items__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    raise TypeError(f"cannot serialise an object of type {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def pack(obj: Any) -> bytes:
    """Bytes of a safetensors file whose metadata holds the JSON tree of ``obj``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    return st_save(tensors, metadata={_META: json.dumps(tree)})


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`; raises DpfplError on anything that is not such a blob."""
    try:
        raw = bytes(data)
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        tree = json.loads(header["__metadata__"][_META])
        tensors = st_load(raw)
    except Exception as exc:  # noqa: BLE001 - any malformed blob
        raise DpfplError(f"not a dpfpl state blob ({type(exc).__name__}: {str(exc)[:120]})") from None
    return _decode(tree, tensors)

"""Reading torch.save'd files without running code from them.

`safe_torch_load(path)` is torch.load through a restricted unpickler that rebuilds tensors and plain
containers only (what torch.load(weights_only=True) allows): every other class the pickle names becomes an
inert `PickledObject` stub that records the pickled state (for an nn.Module: `_parameters`, `_buffers`,
`_modules`), and nothing from the file is executed. sharnn-import reads the reference code's pickled
[model, criterion] with it, sharnn-export the module state of a DeepSpeed ZeRO-0 checkpoint.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import types
import warnings
import zipfile
from pathlib import Path

import torch


class PickledObject:
    """Stands in for any class a pickle names that is not a tensor or a container (nn.Module subclasses, the
    criterion, functions): it keeps the pickled state (for a module: `_parameters`, `_buffers`, `_modules`)
    as attributes and runs none of the named class's code."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_pickled_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        is_pair = isinstance(state, tuple) and len(state) == 2
        if is_pair and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_pickled_state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 pickles of plain objects), for stubs only."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} (only tensors and module state are "
                                     "read)")
    return cls.__new__(cls)


def _safe_globals() -> dict[tuple[str, str], object]:
    """What a pickle may call: tensor rebuilding (as torch.load(weights_only=True)) and plain containers."""
    import _codecs

    from torch import _tensor, _utils
    from torch.nn.parameter import Parameter

    allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
               ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
               ("builtins", "complex"): complex, ("builtins", "object"): object,
               ("_codecs", "encode"): _codecs.encode,
               ("copyreg", "_reconstructor"): _reconstructor, ("torch", "Size"): torch.Size,
               ("torch", "device"): torch.device, ("torch", "Tensor"): torch.Tensor,
               ("torch.nn.parameter", "Parameter"): Parameter,
               ("torch._tensor", "_rebuild_from_type_v2"): _tensor._rebuild_from_type_v2}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(_utils, name):
            allowed[("torch._utils", name)] = getattr(_utils, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_safe_globals()` and torch dtypes; any other name becomes a `PickledObject` subclass.

    torch.load wraps this class: it resolves storage types itself and supplies `persistent_load` for the
    tensor data, then defers every other name to `find_class` here.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = _safe_globals()
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        # Python 2 names (protocol 2 pickles say __builtin__.set), mapped as pickle's own find_class does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (PickledObject,), {"pickled_name": f"{module}.{name}"})
        return self._stubs[key]


# torch.load(pickle_module=...) uses a module's `Unpickler`, `load` and `__name__`.
restricted_pickle = types.SimpleNamespace(
    __name__="sharnn.io.safe_pickle.restricted_pickle", Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load())


def safe_torch_load(path: str | Path, mmap: bool = False):
    """torch.load a file written by torch.save without running code from it: tensors, containers and the
    pickled state of other objects (as `PickledObject` stubs). TorchScript archives are refused (loading
    one runs its code). `mmap`: map the tensors of a zip-format file instead of reading them (for files whose
    tensors are not needed, such as the original's corpus cache)."""
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise ValueError(f"{path} is a TorchScript archive, not a state dict or pickled model; loading "
                             "it would run its code. Save the model's state_dict() instead")
    # weights_only=False is required to pass our own pickle module; its Unpickler allows tensors only.
    with warnings.catch_warnings():  # the legacy format warns it cannot check the stubbed classes' source
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False,
                          mmap=mmap and is_zip)

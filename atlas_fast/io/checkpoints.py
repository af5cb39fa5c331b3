"""Reading the checkpoints users hold into plain state dicts, without the code that wrote them.

Safetensors files and torch files holding a state dict are read as they are. A pickled whole module (the
public aTLAS and task-vector checkpoints are `torch.save(image_encoder)` of the authors' `ImageEncoder`, a
class from their `src.modeling` wrapping an open_clip model) is read, with allow_pickle=True, by an
unpickler that imports nothing: every class outside a short list of torch's tensor-rebuilding functions and
plain containers becomes an inert stand-in that only records its state. The tensors are then collected from
the stand-ins' `_parameters` and `_buffers`, as Module.state_dict would name them, and a wrapper holding a
single model (ImageEncoder.model) is unwrapped so that the names are the wrapped model's (open_clip's).

Torch files of the old (non-zip) format are read as the new ones. A raw `pickle.dump` of a module or state
dict (what the authors' `torch_load_old` reads) holds each storage as `torch.storage._load_from_bytes(bytes)`,
bytes that are themselves an old-format torch file: the stand-in unpickler reads those bytes the same way,
never calling torch's own _load_from_bytes (which unpickles with every import allowed).
"""
import collections
import io
import os
import pickle
import zipfile

import torch

# What the stand-in unpickler takes for real: torch's tensor and parameter rebuilders, dtypes, sizes and
# devices, and plain containers. Everything else becomes a stand-in; nothing is imported.
_REAL = {
    "collections": {"OrderedDict"},
    "copyreg": {"_reconstructor"},
    "builtins": {"set", "frozenset", "slice", "complex", "tuple", "list", "dict", "bytearray", "object"},
    "torch": {"Size", "device"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_device_tensor_from_numpy"},
    "torch._tensor": {"_rebuild_from_type", "_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter"},
    "torch.serialization": {"_get_layout"},
}
# Protocol-2 pickles name Python 2's modules; the base find_class maps them back.
_REAL["__builtin__"], _REAL["copy_reg"] = _REAL["builtins"], _REAL["copyreg"]


class StandIn:
    """An object of a class that could not (or must not) be imported: it keeps whatever state it is given."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_standin_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:           # (dict state, slot state)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_standin_state"] = state

    def __call__(self, *args, **kwargs):
        return StandIn()

    def __repr__(self):
        return f"<stand-in for {type(self).__module__}.{type(self).__qualname__}>"


_stand_in_classes = {}


def _stand_in(module, name):
    key = (module, name)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(name, (StandIn,), {"__module__": module, "__qualname__": name})
    return _stand_in_classes[key]


def _is_dtype(module, name):
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _storage_from_bytes(data):
    """torch.storage._load_from_bytes without its unrestricted unpickling: the bytes are an old-format torch
    file holding one storage."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_StandInPickle)


class StandInUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if name in _REAL.get(module, ()) or _is_dtype(module, name):
            return super().find_class(module, name)
        return _stand_in(module, name)


class _StandInPickle:
    """The pickle_module handed to torch.load: its Unpickler imports nothing."""
    Unpickler = StandInUnpickler
    load = staticmethod(lambda f, **kw: StandInUnpickler(f, **kw).load())
    __name__ = "atlas_fast.io.checkpoints"


def is_module_like(obj):
    d = getattr(obj, "__dict__", {})
    return isinstance(obj, torch.nn.Module) or (isinstance(obj, StandIn) and "_parameters" in d and "_modules" in d)


def module_state_dict(obj, prefix=""):
    """Module.state_dict's names and tensors for a real module or a stand-in of one."""
    if isinstance(obj, torch.nn.Module):
        return {prefix + k: v for k, v in obj.state_dict().items()}
    d = obj.__dict__
    out = collections.OrderedDict()
    for name, p in d.get("_parameters", {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = d.get("_non_persistent_buffers_set", set())
    for name, b in d.get("_buffers", {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, child in d.get("_modules", {}).items():
        if child is not None and is_module_like(child):
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def unwrap_single_model(obj):
    """Descend through wrappers that hold no tensors of their own and exactly one child module (the aTLAS
    ImageEncoder holds `model`, an open_clip CLIP), so that names are the wrapped model's."""
    while is_module_like(obj):
        d = obj.__dict__ if isinstance(obj, StandIn) else vars(obj)
        own = [v for v in list(d.get("_parameters", {}).values()) + list(d.get("_buffers", {}).values())
               if v is not None]
        children = [c for c in d.get("_modules", {}).values() if c is not None]
        if own or len(children) != 1:
            break
        obj = children[0]
    return obj


def _load_pickled(path):
    """A torch file (zip or old format) or a raw pickle, unpickled by stand-ins."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            first = StandInUnpickler(f).load()
        if not (isinstance(first, int) and first == torch.serialization.MAGIC_NUMBER):
            return first                                # a raw pickle; an old torch file starts with the number
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StandInPickle)


def read_object(path, allow_pickle=False, what="checkpoint"):
    """What a torch file (or, with allow_pickle=True, a raw pickle) holds: torch's weights-only loader first,
    then, only with allow_pickle=True, the stand-in unpickler (importing none of the file's classes)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such {what} file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise ValueError(f"{path}: holds pickled objects (e.g. a whole module); read it with allow_pickle=True "
                             f"(--allow-pickle) if you trust the file (no code of its classes is imported or run)"
                             ) from e
        try:
            return _load_pickled(path)
        except Exception as e2:
            raise ValueError(f"{path}: unreadable pickled {what} ({type(e2).__name__}: {e2})") from e2
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated {what} ({type(e).__name__}: {e})") from e


def read_state_dict(path, allow_pickle=False):
    """A checkpoint's state dict: safetensors, a torch file holding a state dict (or {'state_dict': ...}),
    or, only with allow_pickle=True, a pickled module or a raw pickle (read by stand-ins, importing none of
    its code)."""
    return read_module_checkpoint(path, allow_pickle)[0]


def module_class_names(obj):
    """The class names (qualnames) of a module or stand-in and of all its submodules."""
    names = {type(obj).__qualname__}
    d = obj.__dict__ if isinstance(obj, StandIn) else vars(obj)
    for child in d.get("_modules", {}).values():
        if child is not None and is_module_like(child):
            names |= module_class_names(child)
    return names


def read_module_checkpoint(path, allow_pickle=False):
    """(state dict, class names): read_state_dict's state dict, and for a pickled module the class names of
    its (unwrapped) module tree (e.g. the activation a pickled CLIP was built with), else an empty set."""
    path = os.fspath(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file
        try:
            return load_file(path), set()
        except Exception as e:
            raise ValueError(f"{path}: unreadable or truncated safetensors file ({e})") from e
    obj = read_object(path, allow_pickle)
    classes = set()
    if is_module_like(obj):
        obj = unwrap_single_model(obj)
        classes = module_class_names(obj)
        obj = module_state_dict(obj)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors or a module, found {type(obj).__name__}")
    return dict(obj), classes

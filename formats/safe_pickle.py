"""Read pickled PyTorch checkpoints without running code from the pickle.

State dicts go through ``torch.load(weights_only=True)``. Checkpoints that pickle
whole ``nn.Module`` objects (``torch.save(model)``) go through ``RestrictedUnpickler``,
which imports nothing and calls only the validating helpers in ``_ALLOWED``:

* allowed: tensor/parameter rebuild helpers from ``torch._utils`` / ``torch._tensor``
  (replaced here by checked versions), torch storage types and dtypes, ``torch.Size``,
  ``torch.device``, ``collections.OrderedDict``, ``builtins.set``/``frozenset``/``object``,
  ``copyreg._reconstructor`` (stub classes only) and ``_codecs.encode`` (latin-1 only,
  how protocol 2 pickles ``bytes``).
* stubbed: any other global, unless refused below. It becomes an inert ``_Stub`` class
  that NEWOBJ / ``copyreg._reconstructor`` may instantiate and BUILD may hand its state
  to; nothing is imported. Module classes (``src.modeling.ImageEncoder``,
  ``open_clip.model.CLIP``, ``torch.nn.modules.linear.Linear``) and functions kept only
  as attribute values take this path. Calling a stub (REDUCE/INST) is refused, except
  for the enum-like value types in ``_INERT_VALUE_TYPES`` called with plain literals
  (``InterpolationMode('bicubic')`` sits in the transforms the task-vector
  ``ImageEncoder`` keeps).
* refused as soon as the pickle names them: other ``builtins`` (``eval``, ``getattr``...),
  system/interpreter packages in ``_REFUSED_PACKAGES`` (``os``, ``posix``,
  ``subprocess``...) and ``torch`` globals outside ``torch.nn``.

Containers: the torch zip format (storages mmapped, byteorder record honoured) and
the legacy pre-1.6 non-zip format (storages read into memory). The even older tar
format (torch < 0.4) is refused.
"""
from __future__ import annotations

import collections
import os
import pickle
import sys
import tarfile
import zipfile
from typing import NamedTuple

import torch

__all__ = ["load_state_dict", "read_restricted", "UnsafePickleError", "CheckpointFormatError"]


class UnsafePickleError(ValueError):
    """The pickle asked for a global or a call that is not allow-listed."""


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint."""


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LITERAL_TYPES = (str, bytes, int, float, bool, type(None))
_INERT_VALUE_TYPES = frozenset({
    "torchvision.transforms.functional.InterpolationMode", "PIL.Image.Resampling",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
})
_REFUSED_PACKAGES = frozenset({
    "builtins", "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil",
    "socket", "pickle", "_pickle", "marshal", "ctypes", "types", "operator", "functools",
    "code", "codeop", "pty", "webbrowser", "io", "_io", "tempfile", "multiprocessing",
    "threading", "_thread", "signal", "asyncio", "inspect", "gc", "pdb", "timeit", "platform",
    "commands", "popen2", "numpy", "copyreg", "_codecs", "codecs", "torch",
})
_MODULE_RENAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # Python 2 spellings
_MAX_MODULE_VISITS = 1_000_000  # a crafted pickle can share submodules to blow up the walk


class _StubMeta(type):
    """Metaclass of stubs: calling a stub class (REDUCE, INST with args) is refused."""

    def __call__(cls, *args, **kwargs):
        if cls.qualified_name in _INERT_VALUE_TYPES and not kwargs and all(
                isinstance(a, _LITERAL_TYPES) for a in args):
            return cls.__new__(cls, *args)
        raise UnsafePickleError(f"pickle calls {cls.qualified_name!r}, which is not allow-listed")


class _Stub(metaclass=_StubMeta):
    """Inert stand-in for an object of a class that was not imported; keeps what BUILD gives."""
    qualified_name = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ bypasses the metaclass, so this never refuses
        stub = object.__new__(cls)
        stub.args, stub.state = args, None
        return stub

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stub {self.qualified_name}>"


_stub_classes: dict[str, type] = {}


def _stub_class(qualified_name: str) -> type:
    if qualified_name not in _stub_classes:
        _stub_classes[qualified_name] = _StubMeta(
            "Stub", (_Stub,), {"qualified_name": qualified_name, "__slots__": ()})
    return _stub_classes[qualified_name]


class _StorageRef(NamedTuple):
    """What persistent_load returns for a storage: raw bytes plus their dtype."""
    untyped: torch.UntypedStorage
    dtype: torch.dtype


class _StorageType(NamedTuple):
    dtype: torch.dtype


def _refuse(what: str):
    raise UnsafePickleError(what)


def _rebuild_tensor(storage, offset, size, stride, dtype=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        _refuse(f"tensor rebuild got {type(storage).__name__} instead of a checkpoint storage")
    dtype = storage.dtype if dtype is None else dtype
    ints = [offset, *size, *stride]
    if not isinstance(dtype, torch.dtype) or not all(type(i) is int and i >= 0 for i in ints):
        _refuse("tensor rebuild got a malformed dtype, offset, size or stride")
    item = torch.empty(0, dtype=dtype).element_size()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else -1
    if len(size) != len(stride) or (last + 1) * item > storage.untyped.nbytes():
        raise CheckpointFormatError("tensor reaches past the end of its storage")
    tensor = torch.empty(0, dtype=dtype).set_(storage.untyped, offset, tuple(size), tuple(stride))
    if metadata and isinstance(metadata, dict):  # conj/neg bits of complex views
        torch._utils.set_tensor_metadata(tensor, {k: bool(v) for k, v in metadata.items()})
    return tensor


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, metadata=metadata)  # hooks dropped


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, torch.Tensor):
        _refuse("parameter rebuild got something other than a tensor")
    return data  # a plain tensor is all a state dict needs


def _rebuild_from_type(func, new_type, args, state):
    # Tensor subclasses and tensors with attributes: keep the tensor, drop type and attributes.
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or not isinstance(args, tuple):
        _refuse("_rebuild_from_type_v2 wraps a function that is not a tensor rebuild")
    return func(*args)


def _reconstructor(cls, base, state):
    if not (isinstance(cls, _StubMeta) and base is object and state is None):
        _refuse(f"copyreg._reconstructor may only build stub objects, not {cls!r}")
    return cls.__new__(cls)


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _refuse("_codecs.encode is only allowed for protocol-2 bytes (latin-1)")
    return text.encode("latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    # only ever passed to _rebuild_from_type as markers, so stubs are enough
    ("torch", "Tensor"): _stub_class("torch.Tensor"),
    ("torch._tensor", "Tensor"): _stub_class("torch._tensor.Tensor"),
    ("torch.nn.parameter", "Parameter"): _stub_class("torch.nn.parameter.Parameter"),
}
for _name, _dtype in torch.storage._storage_type_to_dtype_map().items():
    _ALLOWED["torch", _name] = _StorageType(_dtype)  # legacy typed storages, e.g. torch.FloatStorage
_ALLOWED.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals from _ALLOWED or to stubs, and storages via a callback.

    ``storage_for(dtype, key, numel, extra)`` returns the ``_StorageRef`` for a persistent id
    ``('storage', storage_type, key, location, numel, *extra)``; without it storages are refused.
    """

    def __init__(self, file, storage_for=None):
        super().__init__(file)
        self._storage_for = storage_for

    def find_class(self, module, name):
        module = _MODULE_RENAMES.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        qualified = f"{module}.{name}"
        package = module.split(".")[0]
        if package in _REFUSED_PACKAGES and not module.startswith("torch.nn."):
            raise UnsafePickleError(f"pickle wants global {qualified!r}, which is not allow-listed")
        return _stub_class(qualified)

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id:
            _refuse(f"unexpected persistent id {saved_id!r:.80}")
        kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module" and len(saved_id) == 4 and isinstance(saved_id[1], _StubMeta):
            return saved_id[1]  # legacy format records module classes with their source; keep the stub
        if kind != "storage" or len(saved_id) < 5 or self._storage_for is None:
            _refuse(f"unexpected persistent id of kind {kind!r:.40}")
        storage_type, key, _location, numel, *extra = saved_id[1:]  # location ignored: all CPU
        if not isinstance(storage_type, _StorageType) or type(numel) is not int or numel < 0:
            _refuse("malformed storage record in pickle")
        return self._storage_for(storage_type.dtype, str(key), numel, extra)


def _storage_nbytes(dtype, numel):
    return numel * torch.empty(0, dtype=dtype).element_size()


def _read_zip(path):
    reader = torch._C.PyTorchFileReader(path)
    with zipfile.ZipFile(path) as archive:  # mmap needs records stored uncompressed, as torch writes them
        mappable = all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    whole_file = torch.UntypedStorage.from_file(path, False, os.path.getsize(path)) if mappable else None
    byteorder = reader.get_record("byteorder").decode() if reader.has_record("byteorder") else sys.byteorder
    loaded = {}

    def storage_for(dtype, key, numel, extra):
        if key not in loaded:
            name, nbytes = f"data/{key}", _storage_nbytes(dtype, numel)
            if not reader.has_record(name) or reader.get_record_size(name) != nbytes:
                raise CheckpointFormatError(f"storage record {name} is missing or has the wrong size")
            if whole_file is not None:
                start = reader.get_record_offset(name)
                untyped = whole_file[start:start + nbytes]
            else:
                untyped = torch.UntypedStorage(nbytes)
                untyped.copy_(torch.UntypedStorage.from_buffer(reader.get_record(name), dtype=torch.uint8))
            if byteorder != sys.byteorder:
                untyped.byteswap(dtype)
            loaded[key] = untyped
        return _StorageRef(loaded[key], dtype)

    import io
    return RestrictedUnpickler(io.BytesIO(reader.get_record("data.pkl")), storage_for).load()


def _read_legacy(file, file_size):
    """Pre-1.6 format: magic, protocol, sys_info, object pickle, storage keys, raw storages."""
    unpickle = lambda storage_for=None: RestrictedUnpickler(file, storage_for).load()  # noqa: E731
    if unpickle() != _LEGACY_MAGIC:
        raise CheckpointFormatError("not a PyTorch checkpoint (neither zip nor legacy format)")
    unpickle()  # protocol version
    if not unpickle().get("little_endian", True):
        raise CheckpointFormatError("big-endian legacy checkpoints are not supported")
    roots = {}

    def storage_for(dtype, key, numel, extra):
        nbytes = _storage_nbytes(dtype, numel)
        if nbytes > file_size:
            raise CheckpointFormatError("storage larger than the file")
        roots.setdefault(key, (torch.UntypedStorage(nbytes), dtype))
        if extra and extra[0] is not None:  # view_metadata = (view_key, offset, size) in elements
            _view_key, offset, size = extra[0]
            item = _storage_nbytes(dtype, 1)
            return _StorageRef(roots[key][0][offset * item:(offset + size) * item], dtype)
        return _StorageRef(roots[key][0], dtype)

    result = unpickle(storage_for)
    for key in unpickle():
        untyped, dtype = roots[str(key)]
        untyped._set_from_file(file, None, False, _storage_nbytes(dtype, 1))  # checks the size itself
    return result


def read_restricted(path):
    """Unpickle ``path`` with RestrictedUnpickler; returns the object tree (stubs for modules)."""
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    if tarfile.is_tarfile(path):
        raise CheckpointFormatError("tar-format checkpoints (torch < 0.4) are not supported")
    with open(path, "rb") as file:
        return _read_legacy(file, os.path.getsize(path))


def _is_module_stub(obj):
    return isinstance(obj, _Stub) and isinstance(obj.state, dict) and "_parameters" in obj.state


def _module_state_dict(root):
    """Same names and order as ``module.state_dict()``: own params, persistent buffers, children."""
    out, visits = {}, 0

    def walk(module, prefix, path):
        nonlocal visits
        visits += 1
        if id(module) in path or visits > _MAX_MODULE_VISITS:
            raise CheckpointFormatError("module tree is cyclic or too large")
        state = module.state
        non_persistent = state.get("_non_persistent_buffers_set") or ()
        entries = list((state.get("_parameters") or {}).items())
        entries += [(n, b) for n, b in (state.get("_buffers") or {}).items() if n not in non_persistent]
        for name, tensor in entries:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointFormatError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + str(name)] = tensor.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not _is_module_stub(child):
                raise CheckpointFormatError(f"{prefix}{name} is not an nn.Module")
            walk(child, f"{prefix}{name}.", path | {id(module)})

    walk(root, "", frozenset())
    return out


def _as_state_dict(obj):
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if _is_module_stub(obj):
        return _module_state_dict(obj), "module"
    if not isinstance(obj, dict):
        what = obj.qualified_name if isinstance(obj, _Stub) else type(obj).__name__
        raise CheckpointFormatError(f"expected a state dict or an nn.Module, found {what}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"state dict entry {name!r:.80} is not a named tensor")
    return {name: tensor.detach() for name, tensor in obj.items()}, "state_dict"


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def load_state_dict(path) -> tuple[dict[str, torch.Tensor], str]:
    """Load a checkpoint as a flat state dict; kind is 'state_dict' or 'module'.

    Raises UnsafePickleError when the pickle wants something outside the allow-list and
    CheckpointFormatError for anything else that goes wrong, always with a one-line message.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    try:
        return _as_state_dict(torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)))
    except Exception:  # e.g. pickled modules, which weights_only refuses: try the restricted reader
        pass
    try:
        return _as_state_dict(read_restricted(path))
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: refused: {error}") from None
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{path}: {error}") from None
    except Exception as error:  # pickle/zip internals: report in one line, no traceback chain
        raise CheckpointFormatError(f"{path}: cannot read checkpoint: {_one_line(error)}") from None

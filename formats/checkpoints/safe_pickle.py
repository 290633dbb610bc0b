"""Read pickled PyTorch checkpoints without running code from the pickle.

State dicts go through ``torch.load(weights_only=True)``. Checkpoints that pickle whole
``nn.Module`` objects (``torch.save(model)``) go through ``RestrictedUnpickler``, which
imports nothing and calls nothing outside ``_ALLOWED``. Each global a pickle names is:

* allowed: checked stand-ins for torch's tensor/parameter rebuild helpers
  (``torch._utils._rebuild_tensor_v2/_v3``, ``_rebuild_parameter[_with_state]``,
  ``torch._tensor._rebuild_from_type_v2``), ``copyreg._reconstructor`` (stub classes only),
  ``_codecs.encode`` (latin-1 only: protocol 2's spelling of ``bytes``), the plain
  constructors ``collections.OrderedDict``, ``builtins.set``/``frozenset``/``object``,
  ``torch.Size``, ``torch.device``, and inert values: storage types (``torch.FloatStorage``,
  ``torch.storage.UntypedStorage``...), dtypes, layouts and memory formats.
* refused on sight: every other ``builtins`` name (``eval``, ``getattr``, ``__import__``),
  anything from the system/interpreter packages in ``_REFUSED_PACKAGES`` (``os``, ``posix``,
  ``subprocess``, ``numpy``...) and any ``torch`` global outside ``torch.nn``.
* stubbed otherwise: an inert class per name, e.g. ``src.modeling.ImageEncoder``,
  ``open_clip.model.CLIP``, ``torch.nn.modules.linear.Linear``, or a function kept as an
  attribute value. NEWOBJ and ``copyreg._reconstructor`` may instantiate a stub and BUILD
  hands it its state (the module's ``__dict__``). Calling a stub (REDUCE, INST with
  arguments) is refused, except for the enum-like ``_INERT_VALUE_TYPES`` called with plain
  literals: ``InterpolationMode('bicubic')`` sits in the torchvision transforms that the
  task-vector ``ImageEncoder`` keeps as attributes.

Containers: the torch zip format (storages mmapped, ``byteorder`` record honoured) and the
legacy pre-1.6 non-zip format (storages read into memory). The tar format of torch < 0.4
is refused. A zip's bounds and the CRC of every record are checked (formats/torch_zip.py)
before torch or this reader sees its bytes.

``read_lazy`` runs the same unpickler without reading any storage: each tensor comes back as a
``TensorSpec`` (storage record, element offset, shape, stride, dtype) that formats/torch_lazy.py
reads by offset, whole or by element ranges.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import tarfile
import warnings
import zipfile
from typing import Callable, NamedTuple

import torch

from tallzip.formats.errors import FormatError, one_line
from tallzip.formats.checkpoints.torch_zip import CheckpointFormatError, TorchZip, is_zip

__all__ = ["load_state_dict", "read_restricted", "read_lazy", "TensorSpec", "UnsafePickleError",
           "CheckpointFormatError"]


class UnsafePickleError(FormatError):
    """The pickle asked for a global or a call that is not allow-listed."""


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
    """Inert stand-in for an object of a class that was not imported; keeps what BUILD gives.
    Each stub class is named after the global it replaces."""
    qualified_name = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ bypasses the metaclass, so this never refuses
        stub = object.__new__(cls)
        stub.args, stub.state = args, None
        return stub

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stub {self.qualified_name}>"


class _StorageRef(NamedTuple):
    """What persistent_load returns for a storage: raw bytes plus their dtype."""
    untyped: torch.UntypedStorage
    dtype: torch.dtype


class _LazyStorage(NamedTuple):
    """What persistent_load returns for a storage that is not read: its record key and size."""
    key: str
    nbytes: int
    dtype: torch.dtype


class TensorSpec(NamedTuple):
    """A tensor of a zip checkpoint, not read: storage record key, element offset, shape, stride, dtype."""
    key: str
    offset: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype

    def detach(self):  # as _plain_tensor does to tensors
        return self


class _NeedsEagerRead(Exception):
    """The lazy reader met something only a real tensor can carry (conj/neg bits)."""


class _StorageType(NamedTuple):
    dtype: torch.dtype


class _TensorRef(NamedTuple):
    """A rebuilt tensor, wrapped (immutably) so that BUILD cannot reach Tensor.__setstate__."""
    tensor: torch.Tensor


class _TypeMarker(NamedTuple):
    """Stands for torch.Tensor / Parameter where a pickle names a tensor's type; never called."""
    name: str


class _Allowed(NamedTuple):
    """An allow-listed function. Being a tuple, pickle's BUILD cannot set attributes on it
    (e.g. ``__defaults__``), so one file cannot weaken the checks for the next."""
    function: Callable

    def __call__(self, *args):
        return self.function(*args)


def _refuse(what: str):
    raise UnsafePickleError(what)


def _rebuild_tensor(storage, offset, size, stride, dtype=None, metadata=None):
    if not isinstance(storage, (_StorageRef, _LazyStorage)):
        _refuse(f"tensor rebuild got {type(storage).__name__} instead of a checkpoint storage")
    dtype = storage.dtype if dtype is None else dtype
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and isinstance(dtype, torch.dtype)
            and all(type(i) is int and i >= 0 for i in (offset, *size, *stride))):
        _refuse("tensor rebuild got a malformed dtype, offset, size or stride")
    item = torch.empty(0, dtype=dtype).element_size()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else -1
    storage_bytes = storage.nbytes if isinstance(storage, _LazyStorage) else storage.untyped.nbytes()
    if len(size) != len(stride) or (last + 1) * item > storage_bytes:
        raise CheckpointFormatError("tensor reaches past the end of its storage")
    if isinstance(storage, _LazyStorage):
        if metadata and isinstance(metadata, dict) and any(metadata.values()):
            raise _NeedsEagerRead()
        return _TensorRef(TensorSpec(storage.key, offset, size, stride, dtype))
    tensor = torch.empty(0, dtype=dtype).set_(storage.untyped, offset, size, stride)
    if metadata and isinstance(metadata, dict):  # conj/neg bits of complex views
        torch._utils.set_tensor_metadata(tensor, {k: bool(v) for k, v in metadata.items()})
    return _TensorRef(tensor)


@_Allowed
def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, metadata=metadata)  # hooks dropped


@_Allowed
def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, dtype, metadata)


@_Allowed
def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, _TensorRef):
        _refuse("parameter rebuild got something other than a tensor")
    return data  # a plain tensor is all a state dict needs


@_Allowed
def _rebuild_from_type(func, new_type, args, state):
    # Tensor subclasses and tensors with attributes: keep the tensor, drop type and attributes.
    rebuilders = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
    if not any(func is f for f in rebuilders) or not isinstance(args, tuple):
        _refuse("_rebuild_from_type_v2 wraps a function that is not a tensor rebuild")
    return func(*args)


@_Allowed
def _reconstructor(cls, base, state):
    if not (isinstance(cls, _StubMeta) and base is object and state is None):
        _refuse(f"copyreg._reconstructor may only build stub objects, not {_brief(cls)}")
    return cls.__new__(cls)


@_Allowed
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
    ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TypeMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.Parameter"),
}
for _name, _dtype in torch.storage._storage_type_to_dtype_map().items():
    _ALLOWED["torch", _name] = _StorageType(_dtype)  # legacy typed storages, e.g. torch.FloatStorage
_ALLOWED.update({("torch", n): v for n, v in vars(torch).items()  # inert enum-like values
                 if isinstance(v, (torch.dtype, torch.layout, torch.memory_format))})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals from _ALLOWED or to stubs, and storages via a callback.

    ``storage_for(dtype, key, numel, extra)`` returns the ``_StorageRef`` for a persistent id
    ``('storage', storage_type, key, location, numel, *extra)``; without it storages are refused.
    """

    def __init__(self, file, storage_for=None):
        super().__init__(file)
        self._storage_for = storage_for
        self._stub_classes = {}  # per file: a pickle can set attributes on its stub classes

    def find_class(self, module, name):
        module = _MODULE_RENAMES.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        qualified = f"{module}.{name}"
        package = module.split(".")[0]
        if package in _REFUSED_PACKAGES and not module.startswith("torch.nn."):
            raise UnsafePickleError(f"pickle wants global {qualified!r}, which is not allow-listed")
        if qualified not in self._stub_classes:
            self._stub_classes[qualified] = _StubMeta(qualified, (_Stub,), {"qualified_name": qualified})
        return self._stub_classes[qualified]

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id:
            raise CheckpointFormatError(f"unexpected persistent id of type {type(saved_id).__name__}")
        kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module" and len(saved_id) == 4 and isinstance(saved_id[1], _StubMeta):
            return saved_id[1]  # legacy format records module classes with their source; keep the stub
        if kind != "storage" or len(saved_id) < 5 or self._storage_for is None:
            raise CheckpointFormatError(f"unexpected persistent id of kind {_brief(kind)}")
        storage_type, key, _location, numel, *extra = saved_id[1:]  # location ignored: all CPU
        if not isinstance(storage_type, _StorageType) or type(numel) is not int or numel < 0:
            raise CheckpointFormatError("malformed storage record in pickle")
        return self._storage_for(storage_type.dtype, str(key), numel, extra)


def _storage_nbytes(dtype, numel):
    return numel * torch.empty(0, dtype=dtype).element_size()


def _zip_records_stored(path):
    """True if every zip record is uncompressed (how torch writes them), so offsets can be mmapped."""
    with zipfile.ZipFile(path) as archive:
        return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def _read_zip(path):
    reader = torch._C.PyTorchFileReader(path)  # resolves the "<archive>/" prefix of record names
    whole_file = (torch.UntypedStorage.from_file(path, False, os.path.getsize(path))
                  if _zip_records_stored(path) else None)
    byteorder = reader.get_record("byteorder").decode() if reader.has_record("byteorder") else sys.byteorder
    loaded = {}

    def storage_for(dtype, key, numel, extra):
        if key not in loaded:
            name, nbytes = f"data/{key}", _storage_nbytes(dtype, numel)
            if not reader.has_record(name) or reader.get_record_size(name) != nbytes:
                raise CheckpointFormatError(f"storage record {name} is missing or has the wrong size")
            if whole_file is not None:
                start = reader.get_record_offset(name)
                untyped = whole_file[start:start + nbytes]  # a view into the private file mapping
            elif nbytes:
                untyped = torch.frombuffer(bytearray(reader.get_record(name)), dtype=torch.uint8).untyped_storage()
            else:
                untyped = torch.UntypedStorage(0)
            if untyped.nbytes() != nbytes:
                raise CheckpointFormatError(f"storage record {name} is truncated")
            if byteorder != sys.byteorder:
                untyped.byteswap(dtype)
            loaded[key] = untyped
        return _StorageRef(loaded[key], dtype)

    return RestrictedUnpickler(io.BytesIO(reader.get_record("data.pkl")), storage_for).load()


def _read_legacy(file, file_size):
    """Pre-1.6 format: magic, protocol, sys_info, object pickle, storage keys, raw storages."""
    def unpickle(storage_for=None):
        return RestrictedUnpickler(file, storage_for).load()

    if unpickle() != _LEGACY_MAGIC:
        raise CheckpointFormatError("not a PyTorch checkpoint (neither zip nor legacy format)")
    unpickle()  # protocol version
    if not unpickle().get("little_endian", True):
        raise CheckpointFormatError("big-endian legacy checkpoints are not supported")
    roots = {}  # key -> (storage filled after the object pickle, dtype)
    budget = [file_size]  # storages cannot hold more bytes than the file: refuse giant allocations

    def storage_for(dtype, key, numel, extra):
        if key not in roots:
            nbytes = _storage_nbytes(dtype, numel)
            budget[0] -= nbytes
            if budget[0] < 0:
                raise CheckpointFormatError("storages add up to more than the file size")
            roots[key] = (torch.UntypedStorage(nbytes), dtype)
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


def read_lazy(path):
    """(specs by name, kind, open TorchZip) for a zip checkpoint whose records are all stored, as
    torch writes them, read without reading any storage; None where only the eager reader can
    (compressed records, the other byte order, the legacy container, a pickle the restricted
    reader does not take). A damaged zip is refused here (DamagedZipError, naming the file)."""
    path = os.fspath(path)
    if not is_zip(path):
        return None
    container = TorchZip(path)
    members = container.members
    if not container.all_stored or "data.pkl" not in members:
        return None
    byteorder = container.read("byteorder").decode("ascii", "replace") if "byteorder" in members else sys.byteorder
    if byteorder != sys.byteorder:
        return None

    def storage_for(dtype, key, numel, extra):
        member, nbytes = members.get(f"data/{key}"), _storage_nbytes(dtype, numel)
        if member is None or member.size != nbytes:
            raise CheckpointFormatError(f"storage record data/{key} is missing or has the wrong size")
        return _LazyStorage(key, nbytes, dtype)

    pickled = container.read("data.pkl")  # CRC-checked
    try:
        specs, kind = _as_state_dict(RestrictedUnpickler(io.BytesIO(pickled), storage_for).load())
    except Exception:  # the eager reader gives the final word, and its own message
        container.close()
        return None
    return specs, kind, container


def verify_zip(path):
    """Refuse a zip checkpoint whose bounds or any record's CRC are wrong (one streamed read)."""
    container = TorchZip(path)
    try:
        container.verify_all()
    finally:
        container.close()


def read_restricted(path):
    """Unpickle ``path`` with RestrictedUnpickler; returns the object tree (stubs for modules)."""
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as file:
        if file.read(4) == b"PK\x03\x04":
            raise CheckpointFormatError("damaged zip archive (truncated download?)")
    if tarfile.is_tarfile(path):
        raise CheckpointFormatError("tar-format checkpoints (torch < 0.4) are not supported")
    with open(path, "rb") as file:
        return _read_legacy(file, os.path.getsize(path))


def _is_module_stub(obj):
    return isinstance(obj, _Stub) and isinstance(obj.state, dict) and "_parameters" in obj.state


def _plain_tensor(value, name):
    tensor = value.tensor if isinstance(value, _TensorRef) else value
    if not isinstance(tensor, (torch.Tensor, TensorSpec)):
        raise CheckpointFormatError(f"{_brief(name)} is a {type(value).__name__}, not a tensor")
    return tensor.detach()  # Parameters become plain tensors, as in module.state_dict()


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
        for name, value in entries:
            if value is not None:
                out[f"{prefix}{name}"] = _plain_tensor(value, f"{prefix}{name}")
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
        raise CheckpointFormatError(f"expected a state dict or an nn.Module, found {type(obj).__name__}")
    if not all(isinstance(name, str) for name in obj):
        raise CheckpointFormatError("state dict has non-string keys")
    return {name: _plain_tensor(value, name) for name, value in obj.items()}, "state_dict"


def _brief(value, limit=80):
    """repr() on one line and short, for messages that quote data from the file."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def load_state_dict(path) -> tuple[dict[str, torch.Tensor], str]:
    """Load a checkpoint as a flat state dict; kind is 'state_dict' or 'module'.

    Raises UnsafePickleError when the pickle wants something outside the allow-list and
    CheckpointFormatError for anything else that goes wrong, always with a one-line message.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    if is_zip(path):
        verify_zip(path)  # torch checks no CRC: a damaged record would load as a wrong tensor
    try:
        mmap = zipfile.is_zipfile(path) and _zip_records_stored(path)
        with warnings.catch_warnings():  # its pickle-protocol chatter is noise when we fall back anyway
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return _as_state_dict(loaded)
    except Exception:  # e.g. pickled modules, which weights_only refuses: try the restricted reader
        pass
    try:
        return _as_state_dict(read_restricted(path))
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: refused: {one_line(error)}") from None
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{path}: {one_line(error)}") from None
    except Exception as error:  # pickle/zip internals: report in one line, no traceback chain
        raise CheckpointFormatError(f"{path}: cannot read checkpoint: {one_line(error, with_type=True)}") from None

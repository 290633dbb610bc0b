"""Tensor dtypes by name, and tensors as raw bits (numpy unsigned views) for the codecs."""
from __future__ import annotations

import numpy as np
import torch

from tallzip.formats.errors import FormatError

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# Unsigned integer views with the same itemsize: the codecs see bits, never float formats.
_BITS_VIEW = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32),
              8: (torch.int64, np.uint64)}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"unsupported tensor dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise FormatError(f"unsupported tensor dtype {name!r}") from None


def torch_bits_dtype(itemsize: int) -> torch.dtype:
    """The torch integer dtype of `itemsize` bytes, to view any tensor's elements as their bits."""
    return _BITS_VIEW[itemsize][0]


def bits_dtype(name: str) -> np.dtype:
    """The numpy unsigned dtype that carries a tensor dtype's bits."""
    return np.dtype(_BITS_VIEW[torch_dtype(name).itemsize][1])


def to_bits(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy unsigned-int array holding the tensor's bits (no copy when already contiguous on CPU)."""
    tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
    if tensor.dtype == torch.bool:
        return tensor.view(torch.uint8).numpy()
    torch_view, np_view = _BITS_VIEW[tensor.element_size()]
    return tensor.view(torch_view).numpy().view(np_view)


def from_bits(array: np.ndarray, name: str, shape) -> torch.Tensor:
    """Inverse of to_bits: rebuild a tensor of dtype `name` and `shape` from its bits."""
    dtype = torch_dtype(name)
    flat = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == torch.bool:
        return flat.view(torch.uint8).to(torch.bool).reshape(shape)
    torch_view, _ = _BITS_VIEW[dtype.itemsize]
    return flat.view(torch_view).view(dtype).reshape(tuple(shape))

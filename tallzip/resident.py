"""Serving many tasks from one process: the family stays on the device, switching tasks is one pass.

    resident = tallzip.open("family.tallz").resident(device="cuda")
    resident.bind(model)          # the model's weights become views of the resident buffers
    resident.switch("cars")       # rewrites them in place: base + mask_cars * mtv
    model(images)

What stays on the device: the base and base + mtv (both in the base's dtype) of every masked
tensor, laid end to end in one flat buffer per dtype, every task's mask bit-packed in the same
layout (1 bit per weight), the tensors no task changed, and each task's own tensors (heads). A
switch unpacks one task's mask bits and selects between the two buffers into a third, the live
weights: a few kernels over the whole model rather than a few per tensor. Selecting between
precomputed base and base + mtv gives exactly the bits of Archive.load(task).

On a CPU the select is done on the bits, live = base ^ (mask * (base ^ (base + mtv))), with the
XOR of the two buffers kept instead of base + mtv: PyTorch's `where` runs ~7x slower there (a
branch per element), the integer multiply and XOR vectorize.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import torch

from . import taskvec
from .bits import unpack_bits
from .errors import TallzipError
from .formats.constants import KIND_MASKED, KIND_SHARED, ROLE_MASK
from .formats.tensors import torch_bits_dtype, torch_dtype
from .formats.writer import available_cpus
from .packing import resolve_device

_ALIGN = 64  # elements: every tensor starts on a whole byte of mask bits and an aligned address
_CPU_SLICE = 1 << 20  # elements per step of a switch on a CPU (a multiple of 8)


class _Group:
    """The masked tensors of one dtype, end to end: base, base + mtv and the live weights."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.spans: dict[str, tuple[int, int, tuple]] = {}  # name -> (offset, count, shape)
        self.size = 0

    def add(self, name: str, shape):
        count = math.prod(shape)
        self.spans[name] = (self.size, count, tuple(shape))
        self.size += -(-count // _ALIGN) * _ALIGN

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        offset, count, shape = self.spans[name]
        return flat[offset:offset + count].view(shape)


class Resident:
    """A family held on one device for fast task switching (made by Archive.resident)."""

    def __init__(self, archive, device="auto", tasks=None):
        self.archive = archive
        self.device = resolve_device(device)
        self.tasks = list(tasks) if tasks is not None else [t for t in archive.tasks if archive.representation(t) == "tall"]
        for task in self.tasks:
            archive.task_entry(task)  # unknown names fail here, with the list of tasks
            if archive.representation(task) != "tall":
                raise TallzipError(f"task {task!r} is kept as {archive.representation(task)}, not tall: resident "
                                   "serving switches masks only; give tasks=[the tall ones], or load() it")
        self.current: str | None = None
        self._groups: dict[torch.dtype, _Group] = {}
        self._shared: dict[str, torch.Tensor] = {}
        self._own: dict[str, dict[str, torch.Tensor]] = {t: {} for t in self.tasks}
        self._bound: dict[str, torch.Tensor] = {}  # name -> the module tensor whose .data follows switches
        self._load()

    # --- building ---------------------------------------------------------------------------
    def _load(self):
        archive, device = self.archive, self.device
        masked = [n for n, info in archive.tensors.items() if info["kind"] == KIND_MASKED]
        for name in masked:
            info = archive.tensors[name]
            dtype = torch_dtype(info["dtype"])
            self._groups.setdefault(dtype, _Group(dtype)).add(name, info["shape"])
        self._base, self._plus, self._live = {}, {}, {}
        self._bits = {t: {} for t in self.tasks}
        for dtype, group in self._groups.items():
            self._base[dtype] = torch.zeros(group.size, dtype=dtype, device=device)
            self._plus[dtype] = torch.zeros(group.size, dtype=dtype, device=device)  # the XOR, on a CPU
            for task in self.tasks:
                self._bits[task][dtype] = torch.zeros(group.size // 8, dtype=torch.uint8, device=device)
        # Decoding (the costly part) runs on worker threads, a few tensors ahead, one per job.
        workers = available_cpus()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tallzip-resident") as pool:
            pending = deque(pool.submit(self._decode_masked, name) for name in masked[:workers + 1])
            for i, name in enumerate(masked):
                base, mtv, bits = pending.popleft().result()
                if i + workers + 1 < len(masked):
                    pending.append(pool.submit(self._decode_masked, masked[i + workers + 1]))
                group = self._groups[torch_dtype(archive.tensors[name]["dtype"])]
                offset, count, _ = group.spans[name]
                base_d = base.to(device).reshape(-1)
                # base + mtv rounded to the base's dtype once, here: taskvec.rebuild rounds the same sum
                plus = (taskvec.as_compute(base_d) + mtv.to(device).reshape(-1)).to(base.dtype)
                self._base[group.dtype][offset:offset + count] = base_d
                self._plus[group.dtype][offset:offset + count] = plus
                start = offset // 8
                for task, packed in zip(self.tasks, bits):
                    self._bits[task][group.dtype][start:start + packed.size] = torch.from_numpy(packed.copy()).to(device)
        for dtype in self._groups:
            self._live[dtype] = self._base[dtype].clone()
            if device.type == "cpu":
                bits = torch_bits_dtype(dtype.itemsize)
                self._plus[dtype].view(bits).bitwise_xor_(self._base[dtype].view(bits))
        for name, info in archive.tensors.items():
            if info["kind"] == KIND_SHARED:
                self._shared[name] = archive.base_tensor(name).to(device)
        for task in self.tasks:
            for name, dtype in archive.task_entry(task)["tensors"]:
                info = archive.tensors.get(name)
                if info is None or info["kind"] not in (KIND_MASKED, KIND_SHARED):
                    self._own[task][name] = archive.task_tensor(task, name, device)
                elif torch_dtype(dtype) != torch_dtype(info["dtype"]):
                    self._own[task][name] = None  # masked or shared, but the task keeps another dtype: cast per switch

    def _decode_masked(self, name):
        archive = self.archive
        mtv = archive.mtv(name)
        context = archive._mask_context(name, mtv)  # one context for all tasks: the codec reuses what it derives
        bits = [archive.reader.read_mask_bits(archive._section(ROLE_MASK, name, task), context) for task in self.tasks]
        return archive.base_tensor(name), mtv, bits

    # --- switching --------------------------------------------------------------------------
    def switch(self, task: str) -> "Resident":
        """Make `task` the live weights: base + mask_task * mtv, written in place."""
        if task not in self._own:
            raise TallzipError(f"task {task!r} is not resident; resident tasks: {', '.join(self.tasks)}")
        for dtype, group in self._groups.items():
            bits, plus, base, live = self._bits[task][dtype], self._plus[dtype], self._base[dtype], self._live[dtype]
            if self.device.type != "cpu":  # one pass over everything
                torch.where(unpack_bits(bits, group.size), plus, base, out=live)
                continue
            view = torch_bits_dtype(dtype.itemsize)
            base_i, flip_i, live_i = base.view(view), plus.view(view), live.view(view)
            for start in range(0, group.size, _CPU_SLICE):  # slices keep the unpacked mask in cache
                stop = min(group.size, start + _CPU_SLICE)
                mask = unpack_bits(bits[start // 8:stop // 8], stop - start)
                torch.mul(flip_i[start:stop], mask, out=live_i[start:stop]).bitwise_xor_(base_i[start:stop])
        self.current = task
        if self._bound:
            for name, tensor in self._task_tensors(task).items():
                if name in self._bound:
                    target = self._bound[name]
                    if target.data_ptr() != tensor.data_ptr() or target.shape != tensor.shape:
                        target.data = tensor
        return self

    def state_dict(self, task: str | None = None) -> "OrderedDict[str, torch.Tensor]":
        """The live task's tensors, in its original order: views of the resident buffers (they
        change at the next switch; clone to keep them). With `task`, switches to it first."""
        if task is not None:
            self.switch(task)
        if self.current is None:
            raise TallzipError("no task is live yet: call switch(task) first")
        return self._task_tensors(self.current)

    def _task_tensors(self, task: str) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        own = self._own[task]
        for name, dtype in self.archive.task_entry(task)["tensors"]:
            if name in own and own[name] is not None:
                out[name] = own[name]
                continue
            info = self.archive.tensors[name]
            if info["kind"] == KIND_SHARED:
                tensor = self._shared[name]
            else:
                group = self._groups[torch_dtype(info["dtype"])]
                tensor = group.view(self._live[group.dtype], name)
            out[name] = tensor if name not in own else tensor.to(torch_dtype(dtype))
        return out

    def bind(self, module: torch.nn.Module, *, prefix: str = "", strict: bool = True) -> list[str]:
        """Point `module`'s parameters and buffers at the live weights (no copy), so that every
        switch() updates the module in place. Names are matched as prefix + the module's own name
        (prefix="visual." binds a vision tower to a CLIP state dict). Returns the bound names.
        strict: every parameter and buffer of the module must be found in the archive."""
        if self.current is None:
            self.switch(self.tasks[0])
        live = self._task_tensors(self.current)
        bound, missing = [], []
        for local, tensor in [*module.named_parameters(), *module.named_buffers()]:
            name = prefix + local
            if name not in live:
                missing.append(local)
                continue
            if tuple(tensor.shape) != tuple(live[name].shape) and name not in self._own[self.current]:
                raise TallzipError(f"cannot bind {local!r}: the module has shape {list(tensor.shape)}, "
                                   f"the archive {list(live[name].shape)}")
            tensor.data = live[name]
            self._bound[name] = tensor
            bound.append(name)
        if strict and missing:
            raise TallzipError(f"the archive has no tensor {prefix + missing[0]!r} for the module's {missing[0]!r} "
                               f"({len(missing)} missing; pass prefix=... or strict=False)")
        return bound

    @property
    def nbytes(self) -> int:
        """Device memory held."""
        tensors = [*self._base.values(), *self._plus.values(), *self._live.values(), *self._shared.values(),
                   *(b for per_task in self._bits.values() for b in per_task.values()),
                   *(t for per_task in self._own.values() for t in per_task.values() if t is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)

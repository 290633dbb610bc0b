"""Serving many tasks from one process: the family stays on the device, switching tasks is one pass.

    resident = tallzip.open("family.tallz").resident(device="cuda")
    resident.bind(model)          # the model's weights become views of the resident buffers
    resident.switch("cars")       # rewrites them in place, bit for bit what load("cars") gives
    model(images)

The tensors tasks rebuild (kind masked, and any base tensor a task added later stores codes or a
delta for) are laid end to end in one flat buffer per dtype: the base, and the live weights that
switch() rewrites. What each task keeps besides, by representation:

* tall: its mask bit-packed in the same layout (1 bit per weight); with base + mtv (in the base's
  dtype) held once for all tall tasks, a switch selects between the two buffers into the live one:
  a few kernels over the whole model. Selecting between precomputed base and base + mtv gives
  exactly the bits of Archive.load(task).
* q8/q4/q3/q2: its codes, packed at 8/4/4/2 bits, and its scales (resident_quant.py); a switch
  computes base + f32(code) * f32(scale) into the live buffer, slice by slice: no float copy.
* lowrank: its factors' and q* tensors' codes and scales (serve/lowrank.py); a switch decodes them chunk by chunk.
* exact: its tensors themselves (lossless, so a full copy in the base's dtype); a switch copies them.

Tensors no task changed are held once; each task's own tensors (heads, and tensors it keeps in
another dtype) are held per task.

On a CPU the tall select is done on the bits, live = base ^ (mask * (base ^ (base + mtv))), with
the XOR of the two buffers kept instead of base + mtv: PyTorch's `where` runs ~7x slower there (a
branch per element), the integer multiply and XOR vectorize.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import torch

from tallzip.ops import taskvec
from tallzip.ops.bits import flip_select_into, unpack_bits
from tallzip.errors import TallzipError
from tallzip.formats.container.constants import (KIND_MASKED, KIND_SHARED, REPRESENTATION_EXACT, REPRESENTATION_LOWRANK, REPRESENTATION_TALL, ROLE_DELTA, ROLE_MASK, ROLE_OWN)
from tallzip.formats.tensors import torch_bits_dtype, torch_dtype
from tallzip.run.threads import available_cpus, resolve_device
from tallzip.serve.quant import GroupLayout, QuantTask, quant_covered, runs
from tallzip.serve.lowrank import LowRankTask

_ALIGN = 64  # elements: every tensor starts on a whole byte of mask bits and an aligned address
_CPU_SLICE = 1 << 20  # elements per step of a switch on a CPU (a multiple of 8)


class _Group:
    """The rebuilt tensors of one dtype, end to end: base, (base + mtv) and the live weights."""

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
        self.tasks = list(tasks) if tasks is not None else list(archive.tasks)
        for task in self.tasks:
            archive.task_entry(task)  # unknown names fail here, with the list of tasks
        self.representations = {t: archive.representation(t) for t in self.tasks}
        self._tall = [t for t in self.tasks if self.representations[t] == REPRESENTATION_TALL]
        self.current: str | None = None
        self._groups: dict[torch.dtype, _Group] = {}
        self._shared: dict[str, torch.Tensor] = {}
        self._own: dict[str, dict[str, torch.Tensor]] = {t: {} for t in self.tasks}
        self._quant: dict[str, dict[torch.dtype, QuantTask]] = {}
        self._exact: dict[str, dict[torch.dtype, torch.Tensor]] = {}
        self._from_base: dict[str, dict[torch.dtype, list]] = {}  # q* task -> runs it takes from the base
        self._layouts: dict[tuple, GroupLayout] = {}
        self._bound: dict[str, torch.Tensor] = {}  # name -> the module tensor whose .data follows switches
        self._load()

    # --- building ---------------------------------------------------------------------------
    def _own_section(self, task: str, name: str) -> bool:
        return self.archive.reader.section(ROLE_OWN, name, task) is not None

    def _load(self):
        archive, device = self.archive, self.device
        masked = [n for n, info in archive.tensors.items() if info["kind"] == KIND_MASKED]
        # a base tensor the others share, for which a task added later stores its own codes or delta
        rebuilt_shared = [n for n, info in archive.tensors.items() if info["kind"] == KIND_SHARED and any(
            archive.has_own_rebuild(t, n) for t in self.tasks)]
        switched = masked + rebuilt_shared
        for name in switched:
            info = archive.tensors[name]
            dtype = torch_dtype(info["dtype"])
            self._groups.setdefault(dtype, _Group(dtype)).add(name, info["shape"])
        self._base, self._plus, self._live = {}, {}, {}
        self._bits = {t: {} for t in self._tall}
        for dtype, group in self._groups.items():
            self._base[dtype] = torch.zeros(group.size, dtype=dtype, device=device)
            if self._tall:
                self._plus[dtype] = torch.zeros(group.size, dtype=dtype, device=device)  # the XOR, on a CPU
            for task in self._tall:
                self._bits[task][dtype] = torch.zeros(group.size // 8, dtype=torch.uint8, device=device)
        # Decoding (the costly part) runs on worker threads, a few tensors ahead, one per job.
        workers = available_cpus()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tallzip-resident") as pool:
            pending = deque(pool.submit(self._decode_switched, name) for name in switched[:workers + 1])
            for i, name in enumerate(switched):
                base, mtv, bits = pending.popleft().result()
                if i + workers + 1 < len(switched):
                    pending.append(pool.submit(self._decode_switched, switched[i + workers + 1]))
                group = self._groups[torch_dtype(archive.tensors[name]["dtype"])]
                offset, count, _ = group.spans[name]
                base_d = base.to(device).reshape(-1)
                self._base[group.dtype][offset:offset + count] = base_d
                if mtv is None:
                    if self._tall:
                        self._plus[group.dtype][offset:offset + count] = base_d  # no mask selects it
                    continue
                # base + mtv rounded to the base's dtype once, here: taskvec.rebuild rounds the same sum
                plus = (taskvec.as_compute(base_d) + mtv.to(device).reshape(-1)).to(base.dtype)
                self._plus[group.dtype][offset:offset + count] = plus
                start = offset // 8
                for task, packed in zip(self._tall, bits):
                    self._bits[task][group.dtype][start:start + packed.size] = torch.from_numpy(packed.copy()).to(device)
        for dtype in self._groups:
            self._live[dtype] = self._base[dtype].clone()
            if device.type == "cpu" and self._tall:
                bits = torch_bits_dtype(dtype.itemsize)
                self._plus[dtype].view(bits).bitwise_xor_(self._base[dtype].view(bits))
        for name, info in archive.tensors.items():
            if info["kind"] == KIND_SHARED and name not in rebuilt_shared:
                self._shared[name] = archive.base_tensor(name).to(device)
        for task in self.tasks:
            self._load_task(task)

    def _load_task(self, task: str):
        """The task's own tensors, and what its representation keeps (q* codes, exact tensors)."""
        archive, rep = self.archive, self.representations[task]
        in_group = {}  # dtype -> names of the layout the task rebuilds from its representation
        for name, dtype in archive.task_entry(task)["tensors"]:
            info = archive.tensors.get(name)
            group = self._groups.get(torch_dtype(info["dtype"])) if info is not None else None
            switched = group is not None and name in group.spans
            if info is None or not (switched or info["kind"] == KIND_SHARED) or self._own_section(task, name):
                self._own[task][name] = archive.task_tensor(task, name, self.device)
            elif torch_dtype(dtype) != torch_dtype(info["dtype"]):
                # kept in another dtype than the base's: tall casts the live weights per switch; a q*
                # rebuild rounds once to the task's dtype, so that tensor is held as the task's own
                self._own[task][name] = None if rep == REPRESENTATION_TALL else archive.task_tensor(task, name, self.device)
            elif switched and rep != REPRESENTATION_TALL:
                in_group.setdefault(group.dtype, []).append(name)
        if rep == REPRESENTATION_EXACT:
            self._exact[task] = {}
            for dtype, group in self._groups.items():
                flat = self._base[dtype].clone()
                for name in in_group.get(dtype, []):
                    if archive.reader.section(ROLE_DELTA, name, task) is not None:
                        offset, count, _ = group.spans[name]
                        flat[offset:offset + count] = archive.task_tensor(task, name, self.device).reshape(-1)
                self._exact[task][dtype] = flat
        elif rep == REPRESENTATION_LOWRANK:
            self._quant[task] = {dtype: LowRankTask(archive, task, group, [n for n in in_group.get(dtype, [])
                                                                        if archive.has_own_rebuild(task, n)], self.device)
                                 for dtype, group in self._groups.items()}
            self._from_base[task] = {dtype: [] for dtype in self._groups}  # rebuild_into starts from the base
        elif rep != REPRESENTATION_TALL:
            self._quant[task], self._from_base[task] = {}, {}
            group_setting = archive.task_entry(task)["quant"]["group"]
            for dtype, group in self._groups.items():
                covered = quant_covered(archive, task, in_group.get(dtype, []))
                key = (dtype, group_setting)
                if key not in self._layouts:
                    plans = {n: archive.plan(None, n) for n in group.spans}
                    self._layouts[key] = GroupLayout(group.spans, plans, group.size, group_setting, self.device)
                self._quant[task][dtype] = QuantTask(archive, task, group, self._layouts[key], covered, self.device)
                self._from_base[task][dtype] = runs(group.spans, [n for n in group.spans if n not in covered])

    def _decode_switched(self, name):
        """(base, mtv or None, [each tall task's mask bits]) of one tensor of the layout."""
        archive = self.archive
        if archive.tensors[name]["kind"] != KIND_MASKED or not self._tall:
            return archive.base_tensor(name), None, []
        mtv = archive.mtv(name)
        context = archive.mask_context(name, mtv)  # one context for all tasks: the codec reuses what it derives
        bits = [archive.reader.read_mask_bits(archive.section_entry(ROLE_MASK, name, task), context) for task in self._tall]
        return archive.base_tensor(name), mtv, bits

    # --- switching --------------------------------------------------------------------------
    def switch(self, task: str) -> "Resident":
        """Make `task` the live weights (its representation's rebuild), written in place."""
        if task not in self._own:
            raise TallzipError(f"task {task!r} is not resident; resident tasks: {', '.join(self.tasks)}")
        rep = self.representations[task]
        for dtype, group in self._groups.items():
            base, live = self._base[dtype], self._live[dtype]
            if rep == REPRESENTATION_EXACT:
                live.copy_(self._exact[task][dtype])
            elif rep != REPRESENTATION_TALL:
                self._quant[task][dtype].rebuild_into(live, base)
                for offset, count in self._from_base[task][dtype]:
                    live[offset:offset + count].copy_(base[offset:offset + count])
            else:
                self._switch_tall(task, dtype, group, base, live)
        self.current = task
        if self._bound:
            for name, tensor in self._task_tensors(task).items():
                if name in self._bound:
                    target = self._bound[name]
                    if target.data_ptr() != tensor.data_ptr() or target.shape != tensor.shape:
                        target.data = tensor
        return self

    def _switch_tall(self, task, dtype, group, base, live):
        bits, plus = self._bits[task][dtype], self._plus[dtype]
        if self.device.type != "cpu":  # one pass over everything
            torch.where(unpack_bits(bits, group.size), plus, base, out=live)
            return
        view = torch_bits_dtype(dtype.itemsize)
        base_i, flip_i, live_i = base.view(view), plus.view(view), live.view(view)
        for start in range(0, group.size, _CPU_SLICE):  # slices keep the unpacked mask in cache
            stop = min(group.size, start + _CPU_SLICE)
            mask = unpack_bits(bits[start // 8:stop // 8], stop - start)
            flip_select_into(live_i[start:stop], flip_i[start:stop], mask, base_i[start:stop])

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
            if name in self._shared:
                tensor = self._shared[name]
            else:
                group = self._groups[torch_dtype(self.archive.tensors[name]["dtype"])]
                tensor = group.view(self._live[group.dtype], name)
            out[name] = tensor if name not in own else tensor.to(torch_dtype(dtype))
        return out

    def bind(self, module: torch.nn.Module, *, prefix: str = "", strict: bool = True) -> list[str]:
        """Point `module`'s parameters and buffers at the live weights (no copy), so that every
        switch() updates the module in place. Names are matched as prefix + the module's own name
        (prefix="visual." binds a vision tower to a CLIP state dict). Returns the bound names.
        strict: every parameter and persistent buffer of the module must be found in the archive."""
        if self.current is None:
            self.switch(self.tasks[0])
        live = self._task_tensors(self.current)
        bound, missing = [], []
        # non-persistent buffers (rotary frequencies) are no part of a checkpoint: the module keeps its own
        persistent = module.state_dict(keep_vars=True).keys()
        buffers = [(local, b) for local, b in module.named_buffers() if local in persistent]
        for local, tensor in [*module.named_parameters(), *buffers]:
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

    def memory(self) -> dict:
        """Device bytes held: {"shared": what all tasks use (base, live weights, base + mtv when a
        task is tall, unchanged tensors, q* group layouts), "tasks": {task: what only it holds}}."""
        size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors if t is not None)  # noqa: E731
        shared = size([*self._base.values(), *self._plus.values(), *self._live.values(), *self._shared.values()])
        shared += sum(layout.nbytes for layout in self._layouts.values())
        tasks = {}
        for task in self.tasks:
            held = size(self._own[task].values()) + size(self._bits.get(task, {}).values())
            held += size(self._exact.get(task, {}).values()) + sum(q.nbytes for q in self._quant.get(task, {}).values())
            tasks[task] = held
        return {"shared": shared, "tasks": tasks}

    @property
    def nbytes(self) -> int:
        """Device memory held."""
        memory = self.memory()
        return memory["shared"] + sum(memory["tasks"].values())

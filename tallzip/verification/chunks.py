"""The units of work of `verify`: one chunk each, so that memory is the budget whatever the number of
tasks and the size of a tensor.

Every chunk of every section is read (its checksum) and decoded exactly once, by one unit:
- a chunk of a base tensor: its base, mtv and the tall tasks' masks (decoded with that mtv chunk as
  their context), the q*/exact tasks' sections, the own copies some tasks keep; against a folder, the
  same elements of each task's original, read by range, are compared with what the archive rebuilds;
- a chunk of a tensor kept per task (integer buffers) or only by tasks (heads): that task's copy;
- a chunk of a section no rebuild reads: checked and decoded all the same;
- a side file, chunk by chunk against the folder's file.
Each unit returns a UnitResult; verification.py sums them in order into the verdicts.
"""
from __future__ import annotations

import torch

from tallzip.formats.container.constants import (DTYPE_SIZES, KIND_MASKED, KIND_PER_TASK, REPRESENTATION_EXACT, REPRESENTATION_LOWRANK, REPRESENTATION_TALL, ROLE_BASE, ROLE_DELTA, ROLE_FILE, ROLE_MASK, ROLE_MTV, ROLE_OWN, ROLE_QCODES, ROLE_QOFFSETS, ROLE_QSCALES)
from tallzip.verification.representations import check_task_chunk, difference_text, lowrank_chunk_sums, lowrank_exceeds
from tallzip.verification.compare import SLICE, ErrorSums, compare_masked_chunk, count_unequal

_OVERHEAD = 1 << 20
# Bytes per element a unit holds besides the tasks' chunks: the base as stored and in float32, the mtv
# as stored and in float32, and the mask codec's working set (as archive.Archive.chunk_cost)
_PER_ELEMENT = 4 + 8 + 24
# The temporaries of one slice of compare_masked_chunk (float32 operands and results of the rule)
_SLICE_BYTES = SLICE * 4 * 16


class TaskFindings:
    def __init__(self):
        self.mask_bits = 0                 # mask bits checked
        self.outside = 0                   # mask bits that disagree beyond the mtv's rounding
        self.within = 0                    # ... and within it (not a difference)
        self.recomputed = 0                # mask bits unlike the rule with the recomputed mtv (whole folder only)
        self.error = ErrorSums()
        self.differences: list[dict] = []  # {"tensor" or "file", "what"}

    def merge(self, other: "TaskFindings"):
        self.mask_bits += other.mask_bits
        self.outside += other.outside
        self.within += other.within
        self.recomputed += other.recomputed
        self.error.merge(other.error)
        self.differences.extend(other.differences)


class UnitResult:
    """What units found. `counts`: (task, tensor, what) -> [differing, of], summed over a tensor's
    chunks before they become one difference; what is "values", "mask" or a q*/exact representation."""

    def __init__(self):
        self.tasks: dict[str, TaskFindings] = {}
        self.mtv_differing: dict[str, int] = {}  # tensor -> weights whose stored mtv is not the recomputed one
        self.counts: dict[tuple, list] = {}
        self.lowrank: dict[tuple, list] = {}  # (task, tensor) -> [||tau - value||^2, ||tau||^2, recorded rel. error]

    def task(self, name) -> TaskFindings:
        return self.tasks.setdefault(name, TaskFindings())

    def count(self, task, name, what, differing, of):
        total = self.counts.setdefault((task, name, what), [0, 0])
        total[0] += differing
        total[1] += of

    def merge(self, other: "UnitResult"):
        for task, part in other.tasks.items():
            self.task(task).merge(part)
        for name, n in other.mtv_differing.items():
            self.mtv_differing[name] = self.mtv_differing.get(name, 0) + n
        for key, (differing, of) in other.counts.items():
            self.count(*key, differing, of)
        for key, (diff_sq, tau_sq, recorded) in other.lowrank.items():
            total = self.lowrank.setdefault(key, [0.0, 0.0, recorded])
            total[0], total[1] = total[0] + diff_sq, total[1] + tau_sq

    def differences(self):
        """The summed counts as differences, one per tensor and task."""
        for (task, name, what), (differing, of) in self.counts.items():
            if not differing:
                continue
            if what == "values":
                text = f"values: {differing:,} of {of:,} differ"
            elif what == "mask":
                text = f"mask: {differing:,} of {of:,} bits differ beyond the stored mtv's rounding"
            else:
                text = difference_text(what, differing, of)
            self.task(task).differences.append({"tensor": name, "what": text})
        for (task, name), (diff_sq, tau_sq, recorded) in self.lowrank.items():
            rel = lowrank_exceeds(diff_sq, tau_sq, recorded)
            if rel is not None:
                self.task(task).differences.append({"tensor": name, "what": f"lowrank: relative error {rel:.4g} of the "
                                                    f"task vector, above the {recorded:.4g} recorded at pack"})


def _representation_roles(archive, task, name) -> list[str]:
    """The sections a q*/exact task's rebuild of `name` reads (Archive.chunk_parts)."""
    if archive.reader.section(ROLE_OWN, name, task) is not None:
        return [ROLE_OWN]
    if archive.representation(task) == REPRESENTATION_EXACT:
        return [ROLE_DELTA]
    if archive.representation(task) == REPRESENTATION_LOWRANK:
        return []  # the task's two streams: checked whole, as sections no chunk rebuild reads
    quant = archive.task_entry(task)["quant"]
    return [ROLE_QCODES, ROLE_QSCALES] + ([ROLE_QOFFSETS] if quant["grid"] != "symmetric" else [])


def units(archive) -> list[tuple]:
    """Every chunk of every section in exactly one unit: (kind, reads, ...), `reads` being the
    (entry, chunk index) pairs the unit reads (its stored bytes, for progress)."""
    reader, out, covered = archive.reader, [], set()

    def section(role, name, task=None):
        return reader.section(role, name, task)

    def key(entry):
        return entry["role"], entry["tensor"], entry["task"]

    for name, info in archive.tensors.items():
        if info["kind"] == KIND_PER_TASK:
            for task in archive.tasks:
                entry = section(ROLE_OWN, name, task)
                if entry is not None:
                    covered.add(key(entry))
                    out += [("own", [(entry, i)], name, task, i, c.start, c.count)
                            for i, c in enumerate(reader.chunks(entry))]
            continue  # its base section, if any, is only checked (below)
        masked = info["kind"] == KIND_MASKED
        plan = archive.plan(None, name)
        mtv = section(ROLE_MTV, name) if masked else None
        # q*/exact tasks with sections of their own for this tensor (rep_verify.py checks them)
        represented = [t for t in archive.tasks if archive.representation(t) != REPRESENTATION_TALL
                       and (masked or archive.has_own_rebuild(t, name))]
        tall = [t for t in archive.tasks if archive.representation(t) == REPRESENTATION_TALL] if mtv else []
        copies = [t for t in archive.tasks if t not in represented and section(ROLE_OWN, name, t) is not None]
        entries = [e for e in [section(ROLE_BASE, name), mtv] if e is not None]
        entries += [section(ROLE_MASK, name, t) for t in tall if t not in copies]
        entries += [section(role, name, t) for t in represented for role in _representation_roles(archive, t, name)]
        entries += [section(ROLE_OWN, name, t) for t in copies]
        entries = [e for e in entries if e is not None]  # a missing one is named where the rebuild needs it
        covered.update(key(e) for e in entries)
        spec = {"mtv": mtv is not None, "tall": [t for t in tall if t not in copies], "represented": represented,
                "copies": copies}
        out += [("chunk", [(e, i) for e in entries], name, i, start, count, spec)
                for i, (start, count) in enumerate(plan)]
    for entry in archive.manifest["sections"]:
        if entry["role"] == ROLE_OWN and entry["tensor"] not in archive.tensors:
            covered.add(key(entry))
            out += [("own", [(entry, i)], entry["tensor"], entry["task"], i, c.start, c.count)
                    for i, c in enumerate(reader.chunks(entry))]
        elif entry["role"] == ROLE_FILE:
            covered.add(key(entry))
            out.append(("file", [(entry, i) for i in range(len(reader.chunks(entry)))], entry))
    for entry in archive.manifest["sections"]:  # a section no rebuild reads is checked all the same
        if key(entry) not in covered:
            out += [("check", [(entry, i)], entry, i) for i in range(len(reader.chunks(entry)))]
    return out


def stored_bytes(archive, unit) -> int:
    return sum(archive.reader.chunks(entry)[i].length for entry, i in unit[1])


def unit_cost(archive, unit, folder_tasks: int) -> int:
    """Roughly what one unit holds in memory while it runs."""
    reader, kind = archive.reader, unit[0]
    if kind in ("check", "file"):
        return max((2 * reader.chunks(e)[i].length + 8 * reader.chunks(e)[i].count for e, i in unit[1]),
                   default=0) + _OVERHEAD
    if kind == "own":
        entry = unit[1][0][0]
        return max(unit[-1], 1) * (2 * DTYPE_SIZES.get(entry["dtype"], 4) + 8) + _OVERHEAD
    _, _, name, _, _, count, spec = unit
    itemsize = DTYPE_SIZES.get(archive.tensors[name]["dtype"], 4)
    per_element = (itemsize + _PER_ELEMENT + len(spec["tall"]) + folder_tasks * itemsize
                   + 8 * (len(spec["represented"]) + len(spec["copies"])))
    return max(count, 1) * per_element + _SLICE_BYTES + _OVERHEAD


class UnitRunner:
    """Runs units against the archive and, where given, the folder (verification._Folder): its
    checkpoints, and `usable`: the (task, tensor) pairs whose original can be compared element by
    element (present, of the packed shape and dtype)."""

    def __init__(self, archive, folder, usable: set):
        self.archive, self.folder, self.usable = archive, folder, usable

    def _originals(self, name, start, count, tasks) -> dict:
        if self.folder is None:
            return {}
        return {t: self.folder.checkpoints[t].read_range(name, start, count) for t in tasks
                if t in self.folder.checkpoints and (t, name) in self.usable}

    def run(self, unit) -> UnitResult:
        kind, result = unit[0], UnitResult()
        if kind == "check":
            entry, index = unit[2], unit[3]
            self.archive.reader.read_chunk(entry, self.archive.reader.chunks(entry)[index])
        elif kind == "file":
            self._side_file(unit[2], result)
        elif kind == "own":
            self._own(*unit[2:], result)
        else:
            self._chunk(*unit[2:], result)
        return result

    def _compare(self, task, name, rebuilt, original, result: UnitResult):
        result.count(task, name, "values", count_unequal(rebuilt, original), original.numel())
        result.task(task).error.add(rebuilt, original)

    def _own(self, name, task, index, start, count, result):
        archive = self.archive
        stored = archive.assemble(archive.chunk_parts(task, name, index), torch.device("cpu"))
        for t, original in self._originals(name, start, count, [task]).items():
            self._compare(t, name, stored, original, result)

    def _chunk(self, name, index, start, count, spec, result):
        archive = self.archive
        base = archive.base_chunk(name, index) if (archive.reader.section(ROLE_BASE, name) is not None
                                                   or self.folder is not None) else None
        shared = (base,) if base is not None else None
        originals = self._originals(name, start, count, archive.tasks)
        for task in spec["represented"]:
            if task in originals and archive.representation(task) == REPRESENTATION_LOWRANK \
                    and archive.reader.section(ROLE_OWN, name, task) is None:
                sums = lowrank_chunk_sums(archive, task, name, index, base, originals[task], result.task(task).error)
                total = result.lowrank.setdefault((task, name), [0.0, 0.0, archive.lowrank(task).rel_error(name)])
                total[0], total[1] = total[0] + sums[0], total[1] + sums[1]
            elif task in originals:
                outside = check_task_chunk(archive, task, name, index, base, originals[task], result.task(task).error)
                result.count(task, name, archive.representation(task), outside, count)
            else:  # decoded (and so checked) all the same
                archive.chunk_parts(task, name, index, shared)
        for task in spec["copies"]:
            stored = archive.assemble(archive.chunk_parts(task, name, index), torch.device("cpu"))
            if task in originals:
                self._compare(task, name, stored, originals[task], result)
        if not spec["mtv"]:
            if archive.tensors[name]["kind"] != KIND_MASKED:  # shared: every other task's tensor is the base
                for task, original in originals.items():
                    if task not in spec["represented"] and task not in spec["copies"]:
                        self._compare(task, name, base, original, result)
            return
        mtv, context = archive.mtv_chunk(name, index)
        reader = archive.reader
        masks = {}
        for task in spec["tall"]:  # decoded with the stored mtv chunk as their context
            entry = archive.section_entry(ROLE_MASK, name, task)
            masks[task] = torch.from_numpy(reader.read_chunk(entry, reader.chunks(entry)[index], context))
        if self.folder is None:
            return
        complete = self.folder.merger is not None and all(t in originals for t in archive.tasks)
        recompute = self.folder.merger.mtv if complete else None
        ordered = {t: originals[t] for t in archive.tasks if t in originals}
        counts, mtv_differing = compare_masked_chunk(
            base, mtv, reader.section(ROLE_MTV, name)["dtype"], masks, ordered, archive.lambdas,
            {t: result.task(t).error for t in masks if t in originals}, recompute)
        if mtv_differing:
            result.mtv_differing[name] = mtv_differing
        for task, (outside, within, unlike) in counts.items():
            findings = result.task(task)
            findings.mask_bits += count
            findings.outside += outside
            findings.within += within
            findings.recomputed += unlike
            result.count(task, name, "mask", outside, count)

    def _side_file(self, entry, result: UnitResult):
        task, fname, reader = entry["task"], entry["tensor"], self.archive.reader
        path = None
        if self.folder is not None and task in self.folder.checkpoints:
            path = self.folder.checkpoints[task].extra_files.get(fname)
            if path is None:
                result.task(task).differences.append({"file": fname, "what": "side file missing from the folder"})
        handle = path.open("rb") if path is not None else None
        same = handle is None or path.stat().st_size == entry["shape"][0]
        try:
            for chunk in reader.chunks(entry):
                data = reader.read_chunk(entry, chunk)
                if handle is not None and same:
                    handle.seek(chunk.start)
                    same = handle.read(chunk.count) == data.tobytes()
        finally:
            if handle is not None:
                handle.close()
        if not same:
            result.task(task).differences.append({"file": fname, "what": "side file bytes differ"})


"""tallzip: one archive for a family of fine-tuned checkpoints (TALL masks, arXiv 2405.07813).

    tallzip.pack(tasks_dir, base_path, "family.tallz")
    archive = tallzip.open("family.tallz"); archive.tasks; archive.load("cars", device="cpu")

The verbs (tallzip/verbs.py): pack, open, extract, verify, info, merge, add, remove. The folders:
ops/ (the math), run/ (budget, scheduler, threads, engines), packing/, archive/ (reading, extract),
verification/ (verify, info), merging/, serve/ (resident), edit/ (add, remove); options.py, errors.py;
formats/ (tallzip.formats: codecs, container, checkpoints) and cli/ (tallzip.cli).
Names load on first use, so `import tallzip` (and `tallzip --help`) imports no torch.
"""
import importlib

from tallzip.errors import TallzipError
from tallzip.version import __version__

# name -> the module that defines it (None: the name is that module itself)
_LAZY = {
    "pack": "tallzip.verbs", "open": "tallzip.verbs", "extract": "tallzip.verbs", "verify": "tallzip.verbs",
    "info": "tallzip.verbs", "merge": "tallzip.verbs", "add": "tallzip.verbs", "remove": "tallzip.verbs",
    "Archive": "tallzip.archive.archive", "select_lambdas": "tallzip.packing.lambdas",
    "select_representation": "tallzip.packing.selection", "agreement": "tallzip.verification.info",
    "StoreOptions": "tallzip.options", "RunOptions": "tallzip.options",
    "editing": None, "inspect": None,
}
_MODULES = {"editing": "tallzip.edit.editing", "inspect": "tallzip.inspect"}

__all__ = ["pack", "open", "extract", "verify", "info", "merge", "add", "remove", "Archive", "select_lambdas",
           "select_representation", "agreement", "StoreOptions", "RunOptions", "TallzipError", "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tallzip' has no attribute {name!r}")
    if _LAZY[name] is None:
        value = importlib.import_module(_MODULES[name])
    else:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""tallzip: one archive for a family of fine-tuned checkpoints (TALL masks, arXiv 2405.07813).

    tallzip.pack(tasks_dir, base=base_path, output="family.tallz")
    archive = tallzip.open("family.tallz"); archive.tasks; archive.load("cars", device="cpu")
"""
__version__ = "0.1.0"

import importlib

# The public names, imported on first use (PEP 562): `import tallzip` (and `tallzip --help`) then costs
# no torch import, ~1.4 s; the first tallzip.pack or tallzip.open pays it.
_PUBLIC = {"TallzipError": ".errors", "pack": ".packing", "select_lambdas": ".packing", "Archive": ".archive",
           "open": ".archive", "merge": ".merging", "agreement": ".inspect",
           "select_representation": ".selection", "editing": ".editing", "add": ".editing", "remove": ".editing"}

__all__ = ["pack", "open", "Archive", "select_lambdas", "select_representation", "merge", "agreement", "add", "remove", "TallzipError", "__version__"]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tallzip' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name], __name__)
    value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])

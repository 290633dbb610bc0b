"""tallzip: one archive for a family of fine-tuned checkpoints (TALL masks, arXiv 2405.07813).

    tallzip.pack(tasks_dir, base=base_path, output="family.tallz")
    archive = tallzip.open("family.tallz"); archive.tasks; archive.load("cars", device="cpu")
"""
from tallzip.version import __version__

from tallzip.errors import TallzipError  # noqa: E402
from tallzip.pack.packing import pack  # noqa: E402
from tallzip.pack.lambdas import select_lambdas  # noqa: E402
from tallzip.archive.archive import Archive, open  # noqa: E402,A001
from tallzip.merge.merging import merge  # noqa: E402
from tallzip.verify.info import agreement  # noqa: E402
from tallzip.pack.selection import select_representation  # noqa: E402
from tallzip.edit import editing  # noqa: E402
from tallzip.edit.editing import add, remove  # noqa: E402

__all__ = ["pack", "open", "Archive", "select_lambdas", "select_representation", "merge", "agreement", "add", "remove", "TallzipError", "__version__"]

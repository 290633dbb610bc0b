"""tallzip: one archive for a family of fine-tuned checkpoints (TALL masks, arXiv 2405.07813).

    tallzip.pack(tasks_dir, base=base_path, output="family.tallz")
    archive = tallzip.open("family.tallz"); archive.tasks; archive.load("cars", device="cpu")
"""
__version__ = "0.1.0"

from .errors import TallzipError  # noqa: E402
from .packing import pack, select_lambdas  # noqa: E402
from .archive import Archive, open  # noqa: E402,A001
from .merging import merge  # noqa: E402
from .inspect import agreement  # noqa: E402
from .selection import select_representation  # noqa: E402
from . import editing  # noqa: E402
from .editing import add, remove  # noqa: E402

__all__ = ["pack", "open", "Archive", "select_lambdas", "select_representation", "merge", "agreement", "add", "remove", "TallzipError", "__version__"]

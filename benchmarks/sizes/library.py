"""The sizes suite's one door into tallzip's internals: the codec registry and the codecs it measures one by
one, the TALL rule and the checkpoint family reader it builds sections with, and the pack defaults it compares
against. The public verbs do not show a section's coded size, so these are needed; a move of the library
changes the imports here only."""
from tallzip.ops import taskvec
from tallzip.ops.tall import tall_mask
from tallzip.family import Family
from tallzip.formats import codecs
from tallzip.formats.codecs import floats as float_codecs, mask_ctx as mask_codecs, mask_levels
from tallzip.formats.tensors import to_bits
from tallzip.run.threads import available_cpus
from tallzip.options import DEFAULT_CODECS, DEFAULT_MTV_DTYPE

__all__ = ["DEFAULT_CODECS", "DEFAULT_MTV_DTYPE", "Family", "available_cpus", "codecs", "float_codecs", "mask_codecs",
           "mask_levels", "tall_mask", "taskvec", "to_bits"]

"""The sizes suite's one door into tallzip's internals: the codec registry and the codecs it measures one by
one, the TALL rule and the checkpoint family reader it builds sections with, and the pack defaults it compares
against. The public verbs do not show a section's coded size, so these are needed; a move of the library
changes the imports here only."""
from tallzip import taskvec
from tallzip.family import Family
from tallzip.formats import codecs, float_codecs, mask_codecs, mask_levels
from tallzip.formats.tensors import to_bits
from tallzip.formats.writer import available_cpus
from tallzip.packing import DEFAULT_CODECS, DEFAULT_MTV_DTYPE

__all__ = ["DEFAULT_CODECS", "DEFAULT_MTV_DTYPE", "Family", "available_cpus", "codecs", "float_codecs", "mask_codecs",
           "mask_levels", "taskvec", "to_bits"]

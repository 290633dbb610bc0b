"""The accuracy suite's one door into tallzip beyond its verbs: an archive's section sizes (summary, ROLE_BASE),
the lambda selector and defaults that pack uses, the representation candidates, the codec registry the
frontier codes its reference layouts with, and the CLI's agreement plot. A move of the library changes the
imports here only (accuracy.py, accuracy_report.py and frontier.py take these names from this module)."""
from tallzip.formats import codecs
from tallzip.formats.container.constants import ROLE_BASE
from tallzip.formats.tensors import to_bits
from tallzip.verification.info import summary
from tallzip.options import DEFAULT_CODECS, DEFAULT_LAMBDA, DEFAULT_LEVEL
from tallzip.packing.lambdas import LambdaSelector
from tallzip.packing.selection import CANDIDATES


def plot_agreement(agreement, path):
    """The CLI's agreement plot (imported on use: it needs matplotlib)."""
    from tallzip.cli.report import plot_agreement as plot
    return plot(agreement, path)


__all__ = ["CANDIDATES", "DEFAULT_CODECS", "DEFAULT_LAMBDA", "DEFAULT_LEVEL", "LambdaSelector", "ROLE_BASE", "codecs",
           "plot_agreement", "summary", "to_bits"]

"""The accuracy suite's one door into tallzip beyond its verbs: an archive's section sizes (summary, ROLE_BASE),
the lambda selector and defaults that pack uses, the representation candidates, the codec registry the
frontier codes its reference layouts with, and the CLI's agreement plot. A move of the library changes the
imports here only (accuracy.py, accuracy_report.py and frontier.py take these names from this module)."""
from tallzip.formats import codecs
from tallzip.formats.constants import ROLE_BASE
from tallzip.formats.tensors import to_bits
from tallzip.inspect import summary
from tallzip.packing import DEFAULT_CODECS, DEFAULT_LEVEL, LambdaSelector
from tallzip.selection import CANDIDATES
from tallzip.taskvec import DEFAULT_LAMBDA


def plot_agreement(agreement, path):
    """The CLI's agreement plot (imported on use: it needs matplotlib)."""
    from tallzip.cli.report import plot_agreement as plot
    return plot(agreement, path)


__all__ = ["CANDIDATES", "DEFAULT_CODECS", "DEFAULT_LAMBDA", "DEFAULT_LEVEL", "LambdaSelector", "ROLE_BASE", "codecs",
           "plot_agreement", "summary", "to_bits"]

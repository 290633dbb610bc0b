"""The entropy coder the context and plane codecs share: rANS from `constriction`.

constriction is written in Rust and vectorised over numpy arrays; formats/SPEC.md spells out the
arithmetic of its AnsCoder and Categorical(perfect=False) so that another implementation can
decode the same words. Imported on first use, so that archives using only the zstd codecs need no
constriction.
"""
from __future__ import annotations

import functools

import numpy as np

from tallzip.formats.codecs.registry import WORD, CodecError


@functools.lru_cache(maxsize=None)
def _constriction():
    try:
        import constriction
    except ImportError:
        raise CodecError("the planes+ans, bits-ctx and bits-lvl codecs need the constriction package (pip install constriction==0.5.0)") from None
    return constriction


def categorical(probabilities):
    # perfect=False: constriction's fast, deterministic quantization; encoder and decoder must agree.
    return _constriction().stream.model.Categorical(probabilities, perfect=False)


def encode(jobs):
    """Entropy-code (symbols, model) jobs into one stream of 32-bit words; decoding pops them in order.

    ANS is a stack: jobs are pushed last-first so that the decoder reads them first-first."""
    coder = _constriction().stream.stack.AnsCoder()
    for symbols, model in reversed(jobs):
        if symbols.size:
            coder.encode_reverse(symbols, model)
    return coder.get_compressed().astype(WORD).tobytes()


def decoder(words):
    return _constriction().stream.stack.AnsCoder(words)


def pop(decoder, model, count):
    return decoder.decode(model, count) if count else np.zeros(0, dtype=np.int32)

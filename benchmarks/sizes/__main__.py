import importlib
import sys

MEASURES = ("storage", "codecs", "chunks")

if len(sys.argv) < 2 or sys.argv[1] not in MEASURES:
    sys.exit(f"usage: python -m benchmarks.sizes {{{','.join(MEASURES)}}} [--help | options]\n"
             + (importlib.import_module("benchmarks.sizes").__doc__ or ""))
result = importlib.import_module(f"benchmarks.sizes.{sys.argv[1]}").main(sys.argv[2:])
sys.exit(result if isinstance(result, int) else 0)

"""The speed and memory suite: every command timed in a fresh process on generated families, A/B against
another checkout with --compare (suite.py, child.py), the CPU cost of each stage (stages.py) and the job
engines side by side (engines.py). Run: python -m benchmarks.speed [engines] --help."""

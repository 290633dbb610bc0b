"""A tiny evaluation function for `tallzip pack --keep-by tests.keep_by_eval:closeness` (tests/test_estimate.py).

Score of a rebuilt task: 1 - ||rebuilt - fine-tuned||^2 / ||fine-tuned - base||^2 over enc.w, read from the family
at $KEEP_BY_FAMILY (a folder holding base.safetensors and tasks/). The fine-tuned model scores 1.0.
"""
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def closeness(task, state_dict) -> float:
    folder = Path(os.environ["KEEP_BY_FAMILY"])
    base = load_file(str(folder / "base.safetensors"))["enc.w"].astype(np.float64)
    tuned = load_file(str(folder / "tasks" / f"{task}.safetensors"))["enc.w"].astype(np.float64)
    rebuilt = state_dict["enc.w"].double().numpy()
    return float(1.0 - np.sum((rebuilt - tuned) ** 2) / np.sum((tuned - base) ** 2))

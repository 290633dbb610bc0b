"""A Hugging Face transformers model built straight from an archive, no files written.

    model = tallzip.serve.hf.from_archive("family.tallz", "chat")     # as from_pretrained(folder)
    resident = tallzip.open("family.tallz").resident(device="cpu")
    resident.bind(model)                                               # then serve every task by switching
    resident.switch("code")

The task's config comes from the config.json (and generation_config.json) the archive keeps as side files
of its folder; the model class is the config's architecture (the class that saved it), and its weights are
`Archive.load(task)`, loaded strictly: no key missing but the tied ones (GPT-2's lm_head), which are tied
back, none unexpected. transformers is optional (`pip install 'tallzip[hf]'`).
"""
from __future__ import annotations

import json

import torch

from tallzip.errors import MissingExtraError, TallzipError
from tallzip.formats.container.constants import ROLE_FILE

HF_EXTRA_HINT = "pip install 'tallzip[hf]'"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def transformers_module():
    """transformers, or a one-line MissingExtraError that names the extra."""
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(f"building a Hugging Face model needs transformers: {HF_EXTRA_HINT}") from None
    return transformers


def side_file(archive, task: str, name: str) -> bytes | None:
    """The bytes of a side file the task's folder held (config.json, ...), or None."""
    if name not in archive.task_entry(task).get("files", []):
        return None
    return archive.read_tensor(archive.section_entry(ROLE_FILE, name, task)).numpy().tobytes()


def _json_file(archive, task: str, name: str) -> dict | None:
    data = side_file(archive, task, name)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as error:
        raise TallzipError(f"task {task!r}: its {name} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise TallzipError(f"task {task!r}: its {name} is not a JSON object")
    return value


def config_of(archive, task: str):
    """The task's transformers config, from its stored config.json."""
    transformers = transformers_module()
    values = _json_file(archive, task, CONFIG_FILE)
    if values is None:
        raise TallzipError(f"task {task!r} has no {CONFIG_FILE}: it was not packed from a transformers folder")
    model_type = values.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise TallzipError(f"task {task!r}: model_type {model_type!r} of its {CONFIG_FILE} is unknown to "
                           f"transformers {transformers.__version__}")
    return transformers.CONFIG_MAPPING[model_type].from_dict(values)


def _model_class(transformers, config):
    """The class that saved the folder (config.architectures), else the causal LM of its model type."""
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForCausalLM


def from_archive(archive, task: str, *, device="cpu", dtype: torch.dtype | None = None):
    """The task as the transformers model `from_pretrained` of its extracted folder gives (eval mode),
    built in memory. archive: an open Archive or a path. dtype: None keeps the stored dtypes (as
    from_pretrained's default "auto"); a floating dtype casts the floating weights."""
    from tallzip.archive.archive import Archive, open as open_archive

    transformers = transformers_module()
    from transformers.initialization import no_init_weights

    if not isinstance(archive, Archive):
        with open_archive(archive) as opened:
            return from_archive(opened, task, device=device, dtype=dtype)
    config = config_of(archive, task)
    device = torch.device(device)
    # built on the device without random initialization: every weight is replaced by the archive's
    # below, while non-persistent buffers (rotary frequencies) are computed by the model as usual
    with no_init_weights(), device:
        model = _model_class(transformers, config)(config)
    state = archive.load(task, device)
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        what = (f"lacks {len(missing)} of the model's tensors (first {missing[0]!r})" if missing else
                f"has {len(result.unexpected_keys)} tensors the model lacks (first {result.unexpected_keys[0]!r})")
        raise TallzipError(f"task {task!r} does not fit {type(model).__name__}: the archive {what}")
    model.tie_weights()
    generation = _json_file(archive, task, GENERATION_CONFIG_FILE)
    if generation is not None and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_dict(generation)
    return model.eval()

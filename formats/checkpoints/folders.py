"""How a checkpoint lies on disk: the file extensions, the names transformers and diffusers give a model's
file(s) in a saved folder, which files of a task folder are its model and which are side files, and how a
folder of task checkpoints (local or behind a URL) is read as task name -> checkpoint path."""
from __future__ import annotations

from pathlib import Path

from tallzip.formats.errors import FormatError
from tallzip.formats.checkpoints.sources import RemotePath, is_url, list_folder

SAFETENSORS_EXT = ".safetensors"
TORCH_EXTS = (".pt", ".pth", ".bin")
CHECKPOINT_EXTS = (SAFETENSORS_EXT,) + TORCH_EXTS
SHARD_INDEX = "model.safetensors.index.json"
# The names transformers and diffusers give a model's file(s) in a saved folder, most preferred first
SHARD_INDEXES = (SHARD_INDEX, "diffusion_pytorch_model.safetensors.index.json")
TORCH_SHARD_INDEXES = ("pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json")
HF_MODEL_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                  "diffusion_pytorch_model.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# config.json, tokenizer files and the like travel with a task (Gemma's tokenizer.json is 17-33 MB); the README
# states this limit (tests/test_task_folders.py checks they agree)
MAX_EXTRA_FILE_BYTES = 64 * 1024 * 1024


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_EXTS)


def shard_index(sharding: dict | None) -> str | None:
    """The index file name of a sharded checkpoint (its `sharding` record), None when not sharded."""
    return sharding.get("index", SHARD_INDEX) if sharding else None


def model_in(folder, names: set[str]) -> tuple[str, str]:
    """Which file(s) of a task folder hold its model, from the folder's file names:
    ("sharded", index name) or ("file", file name). Hugging Face's names first (what transformers and
    diffusers write); otherwise the one checkpoint file, or the paper release's `*finetuned*` one.
    Every other file of the folder is a side file, kept as bytes whatever its extension."""
    adapters = sorted(names & set(ADAPTER_FILES))
    if adapters:
        raise FormatError(f"{folder}: holds {adapters[0]}, a LoRA/adapter; an adapter folder is not a full "
                          f"checkpoint (merge the adapter into its model and save that)")
    for index in SHARD_INDEXES:
        if index in names:
            return "sharded", index
    for index in TORCH_SHARD_INDEXES:
        if index in names:
            raise FormatError(f"{folder}: holds {index}; sharded torch .bin checkpoints are not read "
                              f"(save with safe_serialization=True for sharded safetensors)")
    for name in HF_MODEL_FILES:
        if name in names:
            return "file", name
    files = sorted(n for n in names if Path(n).suffix in CHECKPOINT_EXTS)
    if len(files) > 1:
        finetuned = [n for n in files if "finetuned" in Path(n).stem and not n.startswith("linear")]
        files = finetuned if len(finetuned) == 1 else files
    if len(files) != 1:
        what = "no checkpoint file" if not files else f"{len(files)} checkpoint files ({', '.join(files)})"
        raise FormatError(f"{folder}: holds {what}; a task folder needs exactly one, or a sharded index")
    return "file", files[0]


def checked_side_file(path, size: int):
    """A side file travels whole in the archive: one over the limit is refused, by name, not skipped."""
    if size > MAX_EXTRA_FILE_BYTES:
        raise FormatError(f"{path}: side file of {size} bytes is over the {MAX_EXTRA_FILE_BYTES >> 20} MiB a side file "
                          f"may have; move it out of the task folder")


def refuse_sub_folders(folder, names):
    """A task folder comes back whole or not at all: its files are kept (hidden ones too), and a sub-folder
    (Trainer's `checkpoint-500/`, `.git/`), which the archive cannot hold, is refused by name, never skipped."""
    if names:
        name = sorted(names)[0]
        raise FormatError(f"{folder}: holds the sub-folder {name}/; a task folder's files are all kept, but not its "
                          f"sub-folders: move it out of the task folder (or pack a copy without it)")


def release_head(task_folder: Path) -> Path | None:
    """The classification head that the authors' releases keep beside a task folder.

    Both the task-vector release (`{model}/{Dataset}/finetuned.pt`, `{model}/head_{Dataset}.pt`) and
    the TALL-mask release (`{model}/{Dataset}Val/nonlinear_finetuned.pt`, `{model}/head_{Dataset}Val.pt`)
    do so; the head then travels with its task as a side file."""
    for ext in TORCH_EXTS:
        head = task_folder.parent / f"head_{task_folder.name}{ext}"
        if head.is_file():
            return head
    return None


def discover_tasks(folder, exclude=()) -> dict[str, Path]:
    """Task name -> checkpoint path: each checkpoint file (name = stem) or sub-folder (name = folder name).

    A `head_{X}.pt` beside a task folder `{X}/` is that task's classification head (the released
    layouts), not a task of its own."""
    if is_url(folder):
        return _discover_remote_tasks(folder, exclude)
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder of checkpoints")
    excluded = {Path(p).resolve() for p in exclude}
    tasks = {}
    for entry in sorted(folder.iterdir()):
        if entry.resolve() in excluded or entry.name.startswith("."):
            continue
        task_folder = folder / entry.stem[len("head_"):]
        if entry.stem.startswith("head_") and task_folder.is_dir() and release_head(task_folder) == entry:
            continue
        if entry.is_file() and entry.suffix in CHECKPOINT_EXTS:
            name = entry.stem
        elif entry.is_dir() and (any((entry / i).exists() for i in SHARD_INDEXES) or checkpoint_files(entry)):
            if any(p.resolve() in excluded for p in checkpoint_files(entry)) and len(checkpoint_files(entry)) == 1:
                continue
            name = entry.name
        else:
            continue
        if name in tasks:
            raise FormatError(f"{folder}: two checkpoints are named {name!r} ({tasks[name].name}, {entry.name})")
        tasks[name] = entry
    return tasks


def _discover_remote_tasks(folder, exclude=()) -> dict:
    """discover_tasks for a URL: each .safetensors file (name = stem) or sub-folder holding one or a
    sharded index (name = folder name). Torch pickles and release heads are local-only."""
    excluded = {str(p).rstrip("/") for p in exclude}
    tasks = {}
    for entry in list_folder(folder):
        if entry.location.rstrip("/") in excluded or entry.name.startswith("."):
            continue
        if not entry.is_dir and RemotePath(entry.name).suffix == SAFETENSORS_EXT:
            name = entry.name[:-len(SAFETENSORS_EXT)]
        elif entry.is_dir and any(e.name in SHARD_INDEXES or (not e.is_dir and RemotePath(e.name).suffix in CHECKPOINT_EXTS)
                                  for e in list_folder(entry.location)):
            name = entry.name
        else:
            continue
        if name in tasks:
            raise FormatError(f"{folder}: two checkpoints are named {name!r}")
        tasks[name] = RemotePath(entry.location)
    if not tasks and not list_folder(folder):
        raise FormatError(f"{folder}: not a folder of checkpoints (empty or missing)")
    return tasks

"""Constants of the tallzip archive format (see SPEC.md)."""

MAGIC = b"TALLZIP\x00"
FORMAT_VERSION = 2          # what the writer writes
READABLE_VERSIONS = (1, 2)  # what the reader reads (version 1: one unchunked, sha256-checked section per entry)
# magic (8) | version u32 | flags u32 | manifest offset u64 | manifest length u64 | manifest sha256 (32) | reserved (8)
HEADER_SIZE = 72
HEADER_STRUCT = "<8sIIQQ32s8s"
# Header flags (u32 bit set); a reader refuses any bit it does not know.
FLAG_MANIFEST_ZSTD = 1  # bit 0: the stored manifest is one zstandard frame of the JSON
KNOWN_FLAGS = FLAG_MANIFEST_ZSTD
# zstd level of the manifest (benchmarks/RESULTS.md, "The manifest stored zstd-compressed": 1.08 MB manifest: ViT family, 20 q2 tasks):
# level 9 stores it 8.1x smaller in 23 ms, level 19 9.1x in 1.2 s (an LLM's few-MB manifest: seconds, at
# every pack, add and remove) for 0.01 bits per weight and task less: level 9.
MANIFEST_ZSTD_LEVEL = 9
SECTION_ALIGNMENT = 64  # sections start on 64-byte boundaries so they can be memory-mapped as arrays

# Hard limits checked before any allocation, so a hostile manifest cannot make the reader allocate wildly.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # stored, and (flag bit 0) once decompressed
MAX_JSON_DEPTH = 16
MAX_TENSOR_ELEMENTS = 1 << 40

# Version 2 splits every section into chunks of at most `chunk_elements` elements (manifest field),
# cut at whole rows where a row fits (formats/chunking.py). 2^22 elements: 8 MiB of bfloat16, large
# enough that per-chunk overheads vanish, small enough that a few chunks per CPU fit a memory budget.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ELEMENTS = 1 << 10
MAX_CHUNK_ELEMENTS = 1 << 30
CHUNK_DIGEST = "blake3"  # 32-byte BLAKE3 of each chunk's stored bytes, hex

# Roles of a section in the archive.
ROLE_BASE = "base"      # the pretrained tensor (masked tensors) or the one copy of an unchanged tensor
ROLE_MTV = "mtv"        # the multi-task vector of a masked tensor
ROLE_MASK = "mask"      # one task's TALL mask of a masked tensor
ROLE_OWN = "own"        # a tensor stored as-is for one task (heads, integer buffers, tensors the base lacks)
ROLE_FILE = "file"      # a side file of a folder checkpoint (config.json, ...), as U8 bytes
ROLE_QCODES = "qcodes"  # q8/q4/q3/q2 tasks: one integer code per weight of a changed tensor (I8)
ROLE_QSCALES = "qscales"  # q8/q4/q3/q2 tasks: one scale per group of a chunk's rows (BF16/F16/F32)
ROLE_QOFFSETS = "qoffsets"  # asymmetric grids (q2): one offset per group, laid out as the scales
ROLE_DELTA = "delta"    # exact tasks: the tensor's bits coded given the base's (codec "delta")
ROLE_LRCODES = "lrcodes"  # lowrank tasks: every tensor's codes, end to end, one section per task (I8)
ROLE_LRSCALES = "lrscales"  # lowrank tasks: every tensor's scales, end to end, one section per task

# Kinds of tensor, as the manifest's tensor table records them.
KIND_MASKED = "masked"  # float, in the base and every task with the same shape: base + mtv + a mask per task
KIND_SHARED = "shared"  # identical in the base and every task: stored once
KIND_PER_TASK = "per-task"  # not mergeable (integer, bool) and not identical: a copy per task
# How a task is rebuilt (task entry field "representation"; absent in version 1 = "tall").
REPRESENTATION_TALL = "tall"  # base + mask_t * mtv
REPRESENTATION_EXACT = "exact"  # the task's bits given the base's, lossless
QUANT_BITS = {"q8": 8, "q4": 4, "q3": 3, "q2": 2, "q1": 1}  # base + the task's own vector, quantized (q1: signs)
REPRESENTATION_LOWRANK = "lowrank"  # base + quantized top singular triplets of the task vector (issue 22)
REPRESENTATIONS = (REPRESENTATION_TALL, *QUANT_BITS, REPRESENTATION_LOWRANK, REPRESENTATION_EXACT)
SCALE_DTYPES = ("BF16", "F16", "F32")
# Tensors that are neither live only in the tasks' own sections (ROLE_OWN).

# Tensor dtypes by their safetensors names; the value is the itemsize in bytes.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

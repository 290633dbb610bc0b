"""formats/SPEC.md is enough to read q4 and exact tasks: a decoder written here from the SPEC text
alone (header, manifest, chunk plan, zstd, planes+zstd, planes+ans with its rANS, blosc2+zstd
through the library whose chunk format SPEC names, the q* decode, the delta codec), with numpy,
zstandard, blosc2 and blake3 and nothing of tallzip, reads an archive tallzip wrote and gets the input checkpoints' bytes (exact) and SPEC's q4 formula (computed from
the inputs in numpy) back."""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

import blake3
import blosc2
import numpy as np
import pytest
import zstandard
from safetensors.numpy import save_file as np_save

import tallzip

from test_representations import ROWS, np_quant_rebuild
from tallzip.options import StoreOptions

CHUNK = 1024
NP = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16, "I8": np.int8, "U8": np.uint8, "I64": np.int64}


# --- the reader, from SPEC.md only ---------------------------------------------------------------

def read_archive(path):
    data = open(path, "rb").read()
    magic, version, flags, m_off, m_len, m_sha, _ = struct.unpack("<8sIIQQ32s8s", data[:72])
    assert magic == b"TALLZIP\0" and version == 2 and flags in (0, 1)  # SPEC 'Flags': bit 0 only
    blob = data[m_off:m_off + m_len]
    assert m_off + m_len == len(data) and hashlib.sha256(blob).digest() == m_sha  # over the stored bytes
    if flags & 1:  # one zstandard frame of the JSON, declaring its size, at most 256 MiB
        assert 0 <= zstandard.frame_content_size(blob) <= 256 << 20
        blob = zstandard.ZstdDecompressor().decompress(blob, max_output_size=256 << 20)
    return data, json.loads(blob)


def plan(shape, c):
    """SPEC, 'The chunk plan'."""
    n = math.prod(shape)
    if n <= c:
        return [(0, n)]
    row = math.prod(shape[1:]) if len(shape) >= 2 else 1
    step = (c // row) * row if row <= c else c
    return [(s, min(step, n - s)) for s in range(0, n, step)]


def chunk_view_shape(shape, start, count):
    if count == math.prod(shape):
        return tuple(shape)
    row = math.prod(shape[1:]) if len(shape) >= 2 else 1
    if len(shape) >= 2 and start % row == 0 and count % row == 0:
        return (count // row, *shape[1:])
    return (count,)


def ans_decode(words: np.ndarray, weights: list, count: int) -> list:
    """SPEC's ANS paragraph, word by word."""
    n = len(weights)
    total_f = 2 ** 24 - n
    s = total_f / float(sum(float(w) for w in weights))
    cum, acc = [], 0.0
    for i, w in enumerate(weights):
        cum.append(math.floor(s * acc) + i)
        acc += float(w)
    cum.append(2 ** 24)
    words = [int(w) for w in words]
    pos = len(words) - 1
    x = words[pos]
    while x < 2 ** 32 and pos > 0:
        pos -= 1
        x = x * 2 ** 32 + words[pos]
    out = []
    for _ in range(count):
        r = x % 2 ** 24
        i = next(k for k in range(n) if cum[k] <= r < cum[k + 1])
        x = (x >> 24) * (cum[i + 1] - cum[i]) + r - cum[i]
        if x < 2 ** 32 and pos > 0:
            pos -= 1
            x = x * 2 ** 32 + words[pos]
        out.append(i)
    assert pos == 0 and x == 0  # every word used, x = 0 at the end
    return out


def unrotate(values: np.ndarray, width: int) -> np.ndarray:
    """Undo 'rotated left by one bit when w >= 2'."""
    if width == 1:
        return values
    u = values.astype(f"<u{width}")
    top = np.array(width * 8 - 1, dtype=u.dtype)
    return (u >> np.array(1, dtype=u.dtype)) | (u << top)


def join(planes, width):
    values = np.zeros(planes[0].size, dtype=f"<u{width}")
    for i, plane in enumerate(planes):
        values |= plane.astype(values.dtype) << np.array(8 * i, dtype=values.dtype)
    return unrotate(values, width)


def decode_codec(codec, payload: bytes, params, width: int, count: int) -> np.ndarray:
    """The elements' unsigned bit patterns (`<u{width}`)."""
    if codec == "zstd":
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(payload), dtype=f"<u{width}").copy()
    if codec == "blosc2+zstd":  # Blosc2 chunks (format version 5) back to back, cbytes at offset 12
        assert params == {}
        parts, at = [], 0
        while at < len(payload):
            version, _, flags, typesize, nbytes, _, cbytes = struct.unpack_from("<BBBBiii", payload, at)
            assert 2 <= version <= 5 and typesize == width and list(payload[at + 16:at + 22]) in ([1, 0, 0, 0, 0, 0], [0] * 6)
            parts.append(np.frombuffer(blosc2.decompress2(payload[at:at + cbytes]), dtype=f"<u{width}"))
            assert parts[-1].nbytes == nbytes
            at += cbytes
        return np.concatenate(parts)
    if codec == "planes+zstd":
        planes, at = [], 0
        for size in params["sizes"]:
            planes.append(np.frombuffer(zstandard.ZstdDecompressor().decompress(payload[at:at + size]), dtype=np.uint8))
            at += size
        return join(planes, width)
    assert codec == "planes+ans", codec
    crc, at, planes = int.from_bytes(payload[:4], "little"), 4, []
    for coding, length in params["planes"]:
        segment = payload[at:at + length]
        at += length
        if coding == "raw":
            planes.append(np.frombuffer(segment, dtype=np.uint8))
        elif coding == "zstd":
            planes.append(np.frombuffer(zstandard.ZstdDecompressor().decompress(segment), dtype=np.uint8))
        else:
            assert coding == "ans"
            bitmap = np.frombuffer(segment[:32], dtype=np.uint8)
            present = [v for v in range(256) if bitmap[v // 8] >> (v % 8) & 1]
            weights = np.frombuffer(segment[32:32 + 2 * len(present)], dtype="<u2").tolist()
            words = np.frombuffer(segment[32 + 2 * len(present):], dtype="<u4")
            planes.append(np.array([present[i] for i in ans_decode(words, weights, count)], dtype=np.uint8))
    values = join(planes, width)
    assert zlib.crc32(values.astype(f"<u{width}").tobytes()) & 0xFFFFFFFF == crc
    return values


def section_chunks(data, manifest, role, tensor, task):
    entry = next(s for s in manifest["sections"] if (s["role"], s["tensor"], s["task"]) == (role, tensor, task))
    width = np.dtype(NP[entry["dtype"]]).itemsize
    for chunk in entry["chunks"]:
        payload = data[chunk["offset"]:chunk["offset"] + chunk["length"]]
        assert blake3.blake3(payload).hexdigest() == chunk["blake3"]
        yield entry, chunk, payload, width


def read_section(data, manifest, role, tensor, task=None, counts=None):
    parts = []
    for k, (entry, chunk, payload, width) in enumerate(section_chunks(data, manifest, role, tensor, task)):
        count = counts[k] if counts else None
        parts.append(decode_codec(entry["codec"], payload, chunk["params"], width,
                                  count if count is not None else 0))
    return np.concatenate(parts)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def spec_q4_tensor(data, manifest, name, task):
    """SPEC 'Representations', q*: per chunk, value = f32(code) * f32(scale[r * G + j]), rebuilt
    f32(base) + value."""
    info, quant = manifest["tensors"][name], next(t for t in manifest["tasks"] if t["name"] == task)["quant"]
    assert quant["grid"] == "symmetric" and quant["scale_dtype"] == "BF16"
    shape, c = info["shape"], manifest["chunk_elements"]
    chunks = plan(shape, c)
    base = read_section(data, manifest, "base", name, counts=[n for _, n in chunks]).view(np.float32)
    codes = read_section(data, manifest, "qcodes", name, task, counts=[n for _, n in chunks]).view(np.int8)
    scale_parts = [bf16_to_f32(np.frombuffer(zstandard.ZstdDecompressor().decompress(p), dtype="<u2"))
                   for _, _, p, _ in section_chunks(data, manifest, "qscales", name, task)]
    out = np.empty(math.prod(shape), dtype=np.float32)
    for (start, count), scales in zip(chunks, scale_parts):
        view = chunk_view_shape(shape, start, count)
        cols = view[-1] if view else 1
        g = quant["group"] or cols
        groups = -(-cols // g)
        i = np.arange(count)
        r, j = i // cols, (i % cols) // g
        value = codes[start:start + count].astype(np.float32) * scales[r * groups + j]
        out[start:start + count] = base[start:start + count] + value
    return out.reshape(shape)


def spec_exact_tensor(data, manifest, name, task):
    """SPEC 'Representations', exact: the delta codec, mode sub or xor, against the base chunk."""
    info = manifest["tensors"][name]
    chunks = plan(info["shape"], manifest["chunk_elements"])
    base = read_section(data, manifest, "base", name, counts=[n for _, n in chunks])
    out = []
    for (start, count), (entry, chunk, payload, width) in zip(chunks, section_chunks(data, manifest, "delta", name, task)):
        assert entry["codec"] == "delta"
        params = chunk["params"]
        d = decode_codec(params["codec"], payload[4:], params["params"], width, count)
        b = base[start:start + count].astype(d.dtype)
        if params["mode"] == "xor":
            t = d ^ b
        else:
            ones = np.zeros_like(d) - (d & np.array(1, dtype=d.dtype))  # all ones where z is odd
            t = b + ((d >> np.array(1, dtype=d.dtype)) ^ ones)
        assert zlib.crc32(t.astype(f"<u{width}").tobytes()) & 0xFFFFFFFF == int.from_bytes(payload[:4], "little")
        out.append(t)
    return np.concatenate(out).view(NP[info["dtype"]]).reshape(info["shape"])


# --- the test --------------------------------------------------------------------------------------

@pytest.fixture
def packed(tmp_path):
    rng = np.random.default_rng(21)
    base = {"w": rng.standard_normal((40, 300)).astype(np.float32), "v": rng.standard_normal(3000).astype(np.float32),
            "b": rng.standard_normal(300).astype(np.float32),
            "z": np.array([0.0, -0.0, 1.5, -2.25] * 8, dtype=np.float32),
            "h": (rng.standard_normal((30, 50)).astype(np.float32)).astype(np.float16)}
    np_save(base, str(tmp_path / "base.safetensors"))
    (tmp_path / "tasks").mkdir()
    tasks = {}
    for k in range(2):
        t = {n: (v + (0.02 * rng.standard_normal(v.shape)).astype(v.dtype)) for n, v in base.items()}
        t["z"][1] = 0.0 if k == 0 else -0.0
        tasks[f"t{k}"] = t
        np_save(t, str(tmp_path / "tasks" / f"t{k}.safetensors"))
    out = tmp_path / "a.tallz"
    tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep={"t0": "q4", "t1": "exact"}, chunk_elements=CHUNK))
    return base, tasks, out


@pytest.mark.parametrize("float_codec", ["blosc2+zstd", "planes+zstd", "planes+ans"])
def test_a_decoder_from_the_spec_alone_reads_q4_and_exact(tmp_path, packed, float_codec):
    base, tasks, out = packed
    if float_codec != "blosc2+zstd":  # the default; the base coded with the other codec too
        out = tmp_path / "ans.tallz"
        tallzip.pack(tmp_path / "tasks", tmp_path / "base.safetensors", out, store=StoreOptions(keep={"t0": "q4", "t1": "exact"}, chunk_elements=CHUNK, codecs={"float": float_codec}))
    data, manifest = read_archive(out)
    assert struct.unpack_from("<I", data, 12)[0] == 1  # tallzip writes the manifest zstd-compressed
    assert not {s["role"] for s in manifest["sections"]} & {"mtv", "mask"}
    assert {s["codec"] for s in manifest["sections"] if s["role"] == "base" and s["dtype"] == "F32"} == {float_codec}
    for name in ("w", "v", "b", "z"):
        got = spec_q4_tensor(data, manifest, name, "t0")
        want = np_quant_rebuild(base[name], tasks["t0"][name], 4, ROWS[name])
        assert got.tobytes() == want.tobytes(), name
    for name in ("w", "v", "b", "z", "h"):
        got = spec_exact_tensor(data, manifest, name, "t1")
        assert got.dtype == tasks["t1"][name].dtype and got.tobytes() == tasks["t1"][name].tobytes(), name

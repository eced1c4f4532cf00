"""Deep Compression's packed format (``.slim``): sparse, weight-shared, Huffman-coded weights.

A coded weight is stored as in Han et al. (2016): the positions of its non-zero weights as
relative indices (the number of zeros skipped, in ``index_bits``; a longer run inserts a
filler entry holding a zero), each stored weight as a symbol of ``bits`` bits pointing into a
per-layer codebook of shared float32 values (symbol 0 is zero), and both symbol streams
Huffman-coded with per-layer canonical codes. Every other tensor of the state dict (biases,
batch-norm statistics, layers left dense) is stored raw. The byte layout is documented in
``docs/slim-format.md``; the file carries a version and a CRC-32, so a truncated or corrupted
file is refused with a clear message.

>>> import numpy as np, torch
>>> w = torch.tensor([[0.0, 0.5, 0.0, -0.25], [0.0, 0.0, 0.5, 0.0]])
>>> coded = CodedTensor.from_shared(w, index_bits=2)
>>> torch.equal(coded.decode(), w)
True
"""

from __future__ import annotations

import heapq
import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _io
from ..errors import SlimkitError
from ..models import _replay, apply_weights, build_model, origin_of, register_model_file, structure_of

__all__ = [
    "MAGIC",
    "VERSION",
    "CodedTensor",
    "huffman_lengths",
    "huffman_encode",
    "huffman_decode",
    "entropy_bits",
    "write_packed",
    "read_packed",
    "load_packed",
]

MAGIC = b"SLIM"
VERSION = 1
_HEAD = struct.Struct("<4sHHQII")  # magic, version, flags, payload length, tensors, model JSON length
_CRC = struct.Struct("<I")
RAW, CODED = 0, 1

# dtype codes of raw tensors (little-endian storage)
_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    0: (torch.float32, "<f4"), 1: (torch.float16, "<f2"), 2: (torch.bfloat16, "<i2"), 3: (torch.float64, "<f8"),
    4: (torch.int64, "<i8"), 5: (torch.int32, "<i4"), 6: (torch.int16, "<i2"), 7: (torch.int8, "i1"),
    8: (torch.uint8, "u1"), 9: (torch.bool, "u1"),
}
_CODE_OF = {dt: code for code, (dt, _) in _DTYPES.items()}


# ----------------------------------------------------------------------------- Huffman coding


def huffman_lengths(counts: Sequence[int] | np.ndarray) -> list[int]:
    """Code length per symbol of a Huffman code for these symbol counts (0 for an unused symbol).

    Ties are broken by symbol number, so the code is deterministic; a single used symbol gets
    a 1-bit code.

    >>> huffman_lengths([5, 0, 1, 1])
    [1, 0, 2, 2]
    """
    used = [(int(c), s) for s, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if not used:
        return lengths
    if len(used) == 1:
        lengths[used[0][1]] = 1
        return lengths
    # heap items: (count, tie-breaker, symbols under this node)
    heap = [(c, s, [s]) for c, s in used]
    heapq.heapify(heap)
    order = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, order, s1 + s2))
        order += 1
    return lengths


def _canonical_codes(lengths: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes ``{symbol: (code, length)}``: by length, then by symbol."""
    code, prev_len, out = 0, 0, {}
    for length, sym in sorted((length, s) for s, length in enumerate(lengths) if length > 0):
        code <<= length - prev_len
        out[sym] = (code, length)
        code += 1
        prev_len = length
    return out


def huffman_encode(symbols: np.ndarray, lengths: Sequence[int]) -> bytes:
    """The symbols' canonical Huffman codes, concatenated MSB first, zero-padded to a byte."""
    codes = _canonical_codes(lengths)
    table = {s: format(c, f"0{n}b") for s, (c, n) in codes.items()}
    try:
        bits = "".join(table[int(s)] for s in symbols)
    except KeyError as e:
        raise ValueError(f"symbol {e.args[0]} has no code (its length is 0)") from None
    if not bits:
        return b""
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def huffman_decode(data: bytes, count: int, lengths: Sequence[int]) -> np.ndarray:
    """Decode ``count`` symbols written by :func:`huffman_encode` with the same code lengths."""
    codes = _canonical_codes(lengths)
    out = np.empty(count, dtype=np.int64)
    if count == 0:
        return out
    if not codes:
        raise ValueError("symbols to decode but no code")
    bits = bin(int.from_bytes(data, "big"))[2:].zfill(len(data) * 8) if data else ""
    max_len = max(n for _, n in codes.values())
    by_code = {(n, c): s for s, (c, n) in codes.items()}
    if max_len <= 20:  # one lookup per symbol: every max_len-bit window -> (symbol, length)
        table_sym = np.full(1 << max_len, -1, dtype=np.int64)
        table_len = np.zeros(1 << max_len, dtype=np.int64)
        for (n, c), s in by_code.items():
            lo = c << (max_len - n)
            table_sym[lo : lo + (1 << (max_len - n))] = s
            table_len[lo : lo + (1 << (max_len - n))] = n
        padded = bits + "0" * max_len
        pos = 0
        for i in range(count):
            window = int(padded[pos : pos + max_len], 2)
            n = int(table_len[window])
            if n == 0 or pos + n > len(bits):
                raise ValueError(f"invalid code at bit {pos}")
            out[i] = table_sym[window]
            pos += n
        return out
    pos = 0
    for i in range(count):  # long codes: bit by bit
        c, n = 0, 0
        while True:
            if pos >= len(bits):
                raise ValueError("stream ends inside a code")
            c = (c << 1) | (bits[pos] == "1")
            n += 1
            pos += 1
            if (n, c) in by_code:
                out[i] = by_code[(n, c)]
                break
            if n > max_len:
                raise ValueError(f"invalid code at bit {pos}")
    return out


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon's bound: the fewest bits any symbol-by-symbol code can spend on these symbols."""
    if len(symbols) == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


# ----------------------------------------------------------------------------- a coded tensor


@dataclass
class CodedTensor:
    """A sparse, weight-shared tensor as Deep Compression stores it.

    ``codebook``: the shared values (float32); ``symbols``: per stored entry, 0 for a zero
    (filler) or ``1 + index`` into the codebook; ``rel_index``: per entry, the zeros skipped
    before it (at most ``2**index_bits - 1``); ``bits``: the width of a symbol (the alphabet is
    ``2**bits``: zero plus at most ``2**bits - 1`` shared values).
    """

    shape: tuple[int, ...]
    codebook: np.ndarray
    symbols: np.ndarray
    rel_index: np.ndarray
    bits: int
    index_bits: int

    @classmethod
    def from_shared(cls, weight: torch.Tensor, bits: int | None = None, index_bits: int = 8) -> "CodedTensor":
        """Code a tensor whose non-zero values are few (the shared weights) and mostly zero."""
        w = weight.detach().to(torch.float32).contiguous().reshape(-1).numpy()  # (numel,) row-major
        nz = np.flatnonzero(w != 0)
        values, inverse = np.unique(w[nz], return_inverse=True)
        need = max(1, math.ceil(math.log2(len(values) + 1)))
        if bits is None:
            bits = need
        if need > bits:
            raise SlimkitError(f"the tensor holds {len(values)} distinct non-zero values; {bits}-bit symbols "
                               f"hold at most {2 ** bits - 1}. Share its weights first (k-means) or use more bits.")
        if not 1 <= index_bits <= 8:
            raise SlimkitError(f"index_bits must be in 1..8, got {index_bits}.")
        span = 1 << index_bits
        gaps = np.diff(np.concatenate([[-1], nz])) - 1  # zeros skipped before each non-zero
        fillers = gaps // span  # a filler entry skips span - 1 zeros and stores one zero itself
        rest = gaps % span
        n_entries = int(fillers.sum()) + len(nz)
        symbols = np.zeros(n_entries, dtype=np.int64)
        rel = np.full(n_entries, span - 1, dtype=np.int64)
        ends = np.cumsum(fillers + 1) - 1  # the entry index of each non-zero
        symbols[ends] = inverse + 1
        rel[ends] = rest
        return cls(tuple(int(d) for d in weight.shape), values.astype(np.float32), symbols, rel, int(bits),
                   int(index_bits))

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def decode(self) -> torch.Tensor:
        """The dense float32 tensor."""
        out = np.zeros(self.numel, dtype=np.float32)
        if len(self.symbols):
            positions = np.cumsum(self.rel_index + 1) - 1
            if positions[-1] >= self.numel or self.symbols.max() > len(self.codebook) or self.symbols.min() < 0:
                raise ValueError("entries point outside the tensor or the codebook")
            table = np.concatenate([np.zeros(1, np.float32), self.codebook.astype(np.float32)])
            out[positions] = table[self.symbols]
        return torch.from_numpy(out).reshape(self.shape)

    def stats(self) -> dict[str, Any]:
        """Counts and sizes: entries, fillers, Huffman and fixed-width bits, entropy bounds."""
        wl = huffman_lengths(np.bincount(self.symbols, minlength=len(self.codebook) + 1))
        il = huffman_lengths(np.bincount(self.rel_index, minlength=1 << self.index_bits))
        w_counts = np.bincount(self.symbols, minlength=len(wl))
        i_counts = np.bincount(self.rel_index, minlength=len(il))
        return {
            "entries": int(len(self.symbols)),
            "fillers": int(np.sum(self.symbols == 0)),
            "nonzero": int(np.sum(self.symbols != 0)),
            "centroids": int(len(self.codebook)),
            "weight_huffman_bits": int(np.dot(w_counts, wl)),
            "index_huffman_bits": int(np.dot(i_counts, il)),
            "weight_fixed_bits": int(len(self.symbols) * self.bits),
            "index_fixed_bits": int(len(self.symbols) * self.index_bits),
            "weight_entropy_bits": entropy_bits(self.symbols),
            "index_entropy_bits": entropy_bits(self.rel_index),
        }


# ----------------------------------------------------------------------------- the file


def _model_meta(model: nn.Module) -> dict[str, Any]:
    origin = origin_of(model)
    tokens: dict[str, Any] = {k: origin[k] for k in ("vocab", "pad", "input_dtype") if k in origin}  # token ids
    return {"model": origin.get("model"), "input_shape": origin.get("input_shape"),
            "num_classes": origin.get("num_classes"), **tokens, "structure": structure_of(model)}


def _raw_record(t: torch.Tensor) -> tuple[bytes, dict[str, Any]]:
    t = t.detach().cpu().contiguous()
    if t.dtype not in _CODE_OF:
        raise SlimkitError(f"cannot store a tensor of dtype {t.dtype} in a .slim file.")
    code = _CODE_OF[t.dtype]
    view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    data = view.numpy().astype(_DTYPES[code][1], copy=False).tobytes()
    return struct.pack("<BQ", code, len(data)) + data, {"raw_bytes": len(data)}


def _coded_record(c: CodedTensor) -> tuple[bytes, dict[str, Any]]:
    wl = huffman_lengths(np.bincount(c.symbols, minlength=len(c.codebook) + 1))
    il = huffman_lengths(np.bincount(c.rel_index, minlength=1 << c.index_bits))
    if max(wl + il, default=0) > 255:
        raise SlimkitError("a Huffman code is longer than 255 bits; this cannot be stored.")
    wstream = huffman_encode(c.symbols, wl)
    istream = huffman_encode(c.rel_index, il)
    parts = [
        struct.pack("<BBIH", c.bits, c.index_bits, len(c.symbols), len(c.codebook)),
        c.codebook.astype("<f4").tobytes(),
        bytes(wl), bytes(il),
        struct.pack("<I", len(wstream)), wstream,
        struct.pack("<I", len(istream)), istream,
    ]
    sizes = {"codebook_bytes": 4 * len(c.codebook), "table_bytes": len(wl) + len(il),
             "weight_stream_bytes": len(wstream), "index_stream_bytes": len(istream)}
    return b"".join(parts), sizes


def write_packed(path: str | Path, model: nn.Module, coded: dict[str, CodedTensor]) -> dict[str, Any]:
    """Write ``model``'s state dict to ``path`` (atomically), the tensors in ``coded`` coded.

    ``coded`` maps state-dict keys (``"fc1.weight"``) to their :class:`CodedTensor`; every
    other tensor is stored raw. Returns the byte accounting: ``file_bytes``, the
    ``header_bytes`` (fixed header, model description, CRC) and per tensor its record's bytes.
    """
    state = model.state_dict()
    unknown = [k for k in coded if k not in state]
    if unknown:
        raise SlimkitError(f"coded tensor(s) {unknown} are not in the model's state dict.")
    meta = json.dumps(_model_meta(model), separators=(",", ":")).encode()
    records, tensors = [], {}
    for name, t in state.items():
        key = name.encode()
        head = struct.pack("<H", len(key)) + key
        if name in coded:
            c = coded[name]
            if tuple(t.shape) != c.shape:
                raise SlimkitError(f"coded tensor {name} is shaped {c.shape}, the model's is {tuple(t.shape)}.")
            body, sizes = _coded_record(c)
            head += struct.pack("<BB", CODED, len(c.shape)) + struct.pack(f"<{len(c.shape)}I", *c.shape)
        else:
            body, sizes = _raw_record(t)
            head += struct.pack("<BB", RAW, t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape)
        records.append(head + body)
        tensors[name] = {"kind": "coded" if name in coded else "raw", "bytes": len(head) + len(body), **sizes}
    payload = meta + b"".join(records)
    head = _HEAD.pack(MAGIC, VERSION, 0, len(payload), len(records), len(meta))
    data = head + payload
    data += _CRC.pack(zlib.crc32(data))
    _io.write_bytes(path, data)
    return {"file_bytes": len(data), "header_bytes": _HEAD.size + len(meta) + _CRC.size, "tensors": tensors}


class _Reader:
    def __init__(self, data: bytes, start: int, end: int, source: str):
        self.data, self.pos, self.end, self.source = data, start, end, source

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise SlimkitError(f"{self.source} is corrupt: a record runs past the end of its payload.")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, CodedTensor]]:
    """Read a ``.slim`` file: ``(model description, state dict, coded tensors by key)``.

    The file's length and CRC-32 are checked first: a truncated or corrupted file raises
    :class:`SlimkitError` saying so.
    """
    return _io.read_file(path, "packed model", _parse_packed, expected=PACKED_EXPECTED)


PACKED_EXPECTED = "give a .slim file written by slimkit deep-compress (DIR/model.slim)"


def _parse_packed(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, CodedTensor]]:
    data = path.read_bytes()
    src = f"packed model {path}"
    if not data.startswith(MAGIC) and not (len(data) < len(MAGIC) and MAGIC.startswith(data) and data):
        raise SlimkitError(f"{src} is not a .slim packed model (no 'SLIM' magic at its start); {PACKED_EXPECTED}.")
    if len(data) < _HEAD.size + _CRC.size:
        raise SlimkitError(f"{src} is truncated: {len(data)} bytes, shorter than a .slim header.")
    magic, version, flags, payload_len, n_tensors, meta_len = _HEAD.unpack_from(data)
    if version != VERSION:
        raise SlimkitError(f"{src} is .slim format version {version}; this slimkit reads version {VERSION}. "
                           "Upgrade slimkit to read it.")
    expected = _HEAD.size + payload_len + _CRC.size
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says (corrupt)"
        raise SlimkitError(f"{src} is {what}: the header says {expected} bytes, the file holds {len(data)}.")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise SlimkitError(f"{src} is corrupted: its CRC-32 does not match its content. Re-create or re-copy it.")
    r = _Reader(data, _HEAD.size, len(data) - _CRC.size, src)
    try:
        meta = json.loads(r.take(meta_len).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SlimkitError(f"{src} is corrupt: its model description is not JSON.") from None
    if not isinstance(meta, dict):
        raise SlimkitError(f"{src} is corrupt: its model description is not a JSON object.")
    state: dict[str, torch.Tensor] = {}
    coded: dict[str, CodedTensor] = {}
    for _ in range(n_tensors):
        (name_len,) = r.unpack("<H")
        name = r.take(name_len).decode()
        kind, ndim = r.unpack("<BB")
        shape = tuple(r.unpack(f"<{ndim}I")) if ndim else ()
        if kind == RAW:
            code, nbytes = r.unpack("<BQ")
            if code not in _DTYPES:
                raise SlimkitError(f"{src} is corrupt: tensor {name} has an unknown dtype code {code}.")
            dtype, np_dtype = _DTYPES[code]
            arr = np.frombuffer(r.take(nbytes), dtype=np_dtype).copy()
            if arr.size != math.prod(shape):
                raise SlimkitError(f"{src} is corrupt: tensor {name} holds {arr.size} values for shape {shape}.")
            t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=False))  # native byte order
            t = t.view(torch.bfloat16) if dtype == torch.bfloat16 else t.to(dtype)
            state[name] = t.reshape(shape)
        elif kind == CODED:
            bits, index_bits, entries, k = r.unpack("<BBIH")
            codebook = np.frombuffer(r.take(4 * k), dtype="<f4").astype(np.float32)
            wl = list(r.take(k + 1))
            il = list(r.take(1 << index_bits))
            (wn,) = r.unpack("<I")
            wstream = r.take(wn)
            (inn,) = r.unpack("<I")
            istream = r.take(inn)
            try:
                symbols = huffman_decode(wstream, entries, wl)
                rel = huffman_decode(istream, entries, il)
                c = CodedTensor(shape, codebook, symbols, rel, bits, index_bits)
                state[name] = c.decode()
            except ValueError as e:
                raise SlimkitError(f"{src} is corrupt: tensor {name} does not decode ({e}).") from None
            coded[name] = c
        else:
            raise SlimkitError(f"{src} is corrupt: tensor {name} has an unknown record kind {kind}.")
    if r.pos != r.end:
        raise SlimkitError(f"{src} is corrupt: {r.end - r.pos} bytes follow the last tensor record.")
    return meta, state, coded


def load_packed(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Rebuild the torch model stored in a ``.slim`` file (eval mode).

    The architecture comes from the model description in the file (its spec, data shape and
    recorded structural changes); the weights are decoded exactly, so they equal bit for bit
    those of the weight-shared model that was packed.

    >>> import slimkit
    >>> model = slimkit.load_packed("runs/dc/model.slim")  # doctest: +SKIP
    """
    meta, state, _ = read_packed(path)
    spec = meta.get("model")
    if not isinstance(spec, str) or not spec or not meta.get("input_shape") or not meta.get("num_classes"):
        raise SlimkitError(f"{path} does not say which architecture it holds (no model spec); it cannot be rebuilt.")
    model = build_model(spec, input_shape=tuple(meta["input_shape"]), num_classes=int(meta["num_classes"]),
                        trust_pickle=trust_pickle, vocab=meta.get("vocab"), pad=meta.get("pad"))
    if meta.get("structure"):
        _replay(model, meta["structure"], str(path))
    apply_weights(model, state, str(path), spec)
    return model.eval()


register_model_file(".slim", lambda path, trust_pickle: load_packed(path, trust_pickle=trust_pickle))

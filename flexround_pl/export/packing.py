"""Dense bit packing of integer codes (1 to 8 bits per value).

Values are laid out as one little-endian bit stream: bit ``j`` of value ``i``
is bit ``i * bits + j`` of the stream, and stream bit ``k`` is bit ``k % 8`` of
byte ``k // 8``. So 4-bit codes are two per byte (value ``2i`` in the low
nibble of byte ``i``), 2-bit codes four per byte, 8-bit codes one byte each,
and 3 / 5 / 6 / 7-bit codes straddle bytes with no padding except at the very
end (``ceil(n * bits / 8)`` bytes for ``n`` values).

Packing works on unsigned values in ``[0, 2**bits)``; :func:`pack_codes` /
:func:`unpack_codes` add the offset that maps a signed grid
``[-2^(b-1), 2^(b-1) - 1]`` (int8 codes) onto it. Everything is plain
``torch`` on CPU, chunked so that a large layer never needs more than a few
tens of MiB of temporaries.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import Tensor

#: Values per chunk: a multiple of 8, so every chunk starts on a byte boundary.
_CHUNK = 1 << 20


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` values of ``bits`` bits occupy once packed."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer ``values`` (any shape, each in ``[0, 2**bits)``) into a 1-D uint8 tensor."""
    _check_bits(bits)
    v = values.detach().reshape(-1).cpu()
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise TypeError(f"pack needs an integer tensor, got {v.dtype}")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(
            f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}] "
            f"not inside [0, {(1 << bits) - 1}]"
        )
    if bits == 8:
        return v.to(torch.uint8).clone()
    n = v.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    value_shifts = torch.arange(bits, dtype=torch.int32)
    byte_shifts = torch.arange(8, dtype=torch.int32)
    for start in range(0, n, _CHUNK):
        chunk = v[start : start + _CHUNK].to(torch.int32)
        stream = ((chunk[:, None] >> value_shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        chunk_bytes = (stream.reshape(-1, 8) << byte_shifts).sum(1).to(torch.uint8)
        first = start * bits // 8
        out[first : first + chunk_bytes.numel()] = chunk_bytes
    return out


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: ``numel`` unsigned values as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed codes hold {packed.numel()} bytes but {numel} values of {bits} bits need {expected}"
        )
    p = packed.cpu()
    if bits == 8:
        return p.clone()
    out = torch.empty(numel, dtype=torch.uint8)
    value_shifts = torch.arange(bits, dtype=torch.int32)
    byte_shifts = torch.arange(8, dtype=torch.int32)
    for start in range(0, numel, _CHUNK):
        stop = min(start + _CHUNK, numel)
        chunk_bytes = p[start * bits // 8 : packed_nbytes(stop, bits)].to(torch.int32)
        stream = ((chunk_bytes[:, None] >> byte_shifts) & 1).reshape(-1)[: (stop - start) * bits]
        out[start:stop] = (stream.reshape(-1, bits) << value_shifts).sum(1).to(torch.uint8)
    return out


def code_offset(dtype: torch.dtype, bits: int) -> int:
    """What :func:`pack_codes` adds to make codes unsigned: ``2^(b-1)`` for int8 codes, 0 for uint8."""
    if dtype == torch.int8:
        return 1 << (bits - 1)
    if dtype == torch.uint8:
        return 0
    raise ValueError(f"quantized codes must be int8 (symmetric) or uint8 (asymmetric), got {dtype}")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack int8 (signed grid) or uint8 (unsigned grid) codes of ``bits`` bits."""
    offset = code_offset(codes.dtype, bits)
    return pack(codes.to(torch.int32) + offset, bits)


def unpack_codes(packed: Tensor, bits: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack_codes`: codes of ``shape`` and ``dtype`` (int8 / uint8)."""
    offset = code_offset(dtype, bits)
    numel = 1
    for s in shape:
        numel *= int(s)
    values = unpack(packed, bits, numel).to(torch.int16) - offset
    return values.to(dtype).reshape(tuple(int(s) for s in shape))


def pack_rows_int32(values: Tensor, bits: int) -> Tensor:
    """Each row of unsigned ``values`` ``[rows, cols]`` as its own dense little-endian bit stream in int32 words.

    ``[rows, ceil(cols * bits / 32)]``: value ``j`` of a row sits at bits
    ``j*bits ...`` of the row's stream, each row padded with zero bits to a
    whole word. This is the packing of GPTQ's ``qweight`` / ``qzeros`` (for
    2/3/4/8 bits; GPTQ stores the transpose) and of compressed-tensors'
    ``weight_packed``.
    """
    if sys.byteorder != "little":
        raise RuntimeError("int32 packing assumes a little-endian host")
    rows, cols = values.shape
    padded = -(-cols // 32) * 32  # 32 values of b bits fill exactly b words
    v = values.to(torch.int32)
    if padded != cols:
        v = torch.nn.functional.pad(v, (0, padded - cols))
    words = pack(v.reshape(-1), bits).view(torch.int32).reshape(rows, padded * bits // 32)
    return words[:, : -(-cols * bits // 32)].contiguous()


__all__ = ["code_offset", "pack", "pack_codes", "pack_rows_int32", "packed_nbytes", "unpack", "unpack_codes"]

"""Versioned binary container for named byte blobs plus a JSON metadata dict.

Layout (all integers little endian)::

    b"TNDM" | version: uint16 | header_len: uint32 | header JSON (utf-8, header_len bytes)
    | blob bytes | CRC32: uint32 over everything before it

The header JSON is ``{"meta": {...}, "blobs": [{"name", "offset", "nbytes"}, ...]}`` where
``offset`` is relative to the start of the blob region. Every decoding failure raises
:class:`CodecError` with a message saying what is wrong, so that a server can hand a
readable reason back to the peer instead of a stack trace from struct/json internals.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

MAGIC = b"TNDM"
FORMAT_VERSION = 1

_FIXED = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
_MIN_SIZE = _FIXED.size + _CRC.size


class CodecError(ValueError):
    """A payload (container, tensor or merge plan) could not be encoded or decoded."""


def pack_container(meta: dict[str, Any], blobs: dict[str, bytes]) -> bytes:
    """Serialize ``meta`` (JSON-able dict) and ``blobs`` (name -> bytes) into one payload."""
    views = {}
    for name, blob in blobs.items():
        if not isinstance(name, str):
            raise CodecError(f"blob names must be str, got {type(name).__name__}")
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise CodecError(f"blob {name!r} must be bytes, got {type(blob).__name__}")
        views[name] = bytes(memoryview(blob).cast("B"))
    header = _header(meta, [(name, len(v)) for name, v in views.items()])
    body = b"".join([_FIXED.pack(MAGIC, FORMAT_VERSION, len(header)), header, *views.values()])
    return body + _CRC.pack(zlib.crc32(body))


def container_size(meta: dict[str, Any], blob_sizes: list[tuple[str, int]]) -> int:
    """Exact bytes :func:`pack_container` writes for ``meta`` and blobs of these names and sizes,
    in this order (so a size can be predicted without the data)."""
    return _FIXED.size + len(_header(meta, blob_sizes)) + sum(n for _, n in blob_sizes) + _CRC.size


def _header(meta: dict[str, Any], blob_sizes: list[tuple[str, int]]) -> bytes:
    if not isinstance(meta, dict):
        raise CodecError(f"meta must be a dict, got {type(meta).__name__}")
    entries: list[dict[str, Any]] = []
    offset = 0
    for name, nbytes in blob_sizes:
        entries.append({"name": name, "offset": offset, "nbytes": nbytes})
        offset += nbytes
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and peers in other languages reject them.
        return json.dumps({"meta": meta, "blobs": entries}, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CodecError(f"meta is not JSON-serializable: {exc}") from exc


def unpack_container(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse a payload made by :func:`pack_container`; raise :class:`CodecError` on any fault."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    header_end = _check_fixed_header(view)
    header = _parse_header(view, header_end)
    blob_end = max((e["offset"] + e["nbytes"] for e in header["blobs"]), default=0)
    expected = header_end + blob_end + _CRC.size
    if len(view) != expected:
        _raise_length_mismatch(view, header, header_end, expected)
    _check_crc(view)
    _check_blob_ranges(header["blobs"])
    region = view[header_end : header_end + blob_end]
    blobs = {
        e["name"]: bytes(region[e["offset"] : e["offset"] + e["nbytes"]]) for e in header["blobs"]
    }
    return header["meta"], blobs


def _check_fixed_header(view: memoryview) -> int:
    """Validate magic/version/length fields; return the offset where the blob region starts."""
    if len(view) < _FIXED.size:
        if bytes(view[: len(MAGIC)]) != MAGIC[: min(len(view), len(MAGIC))]:
            raise CodecError("not a Tandem payload (bad magic)")
        raise CodecError(
            f"truncated Tandem payload: expected at least {_MIN_SIZE} bytes, got {len(view)}"
        )
    magic, version, header_len = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(f"not a Tandem payload (bad magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported Tandem format version {version} (this build supports version "
            f"{FORMAT_VERSION})"
        )
    header_end = _FIXED.size + header_len
    if len(view) < header_end + _CRC.size:
        raise CodecError(
            f"truncated Tandem payload: expected at least {header_end + _CRC.size} bytes, "
            f"got {len(view)}"
        )
    return header_end


def _raise_length_mismatch(
    view: memoryview, header: dict[str, Any], header_end: int, expected: int
) -> None:
    """Tell a truncated/padded payload apart from an intact one whose header lies.

    If the last four bytes are a valid CRC of the rest, the payload arrived whole and the
    header's blob table does not match its blob region (a writer bug); otherwise bytes were
    lost or added in transit.
    """
    (stored,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    intact = stored == zlib.crc32(view[: len(view) - _CRC.size])
    region = len(view) - header_end - _CRC.size
    if intact and len(view) < expected:
        bad = next(e for e in header["blobs"] if e["offset"] + e["nbytes"] > region)
        raise CodecError(
            f"bad Tandem header: blob {bad['name']!r} range [{bad['offset']}, "
            f"{bad['offset'] + bad['nbytes']}) is out of bounds of the {region}-byte blob region"
        )
    if intact:
        raise CodecError(
            f"bad Tandem header: {len(view) - expected} bytes of the blob region are not "
            "referenced by any blob"
        )
    if len(view) < expected:
        raise CodecError(f"truncated Tandem payload: expected {expected} bytes, got {len(view)}")
    raise CodecError(
        f"Tandem payload has trailing bytes: expected {expected} bytes, got {len(view)}"
    )


def _check_crc(view: memoryview) -> None:
    (stored,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    actual = zlib.crc32(view[: len(view) - _CRC.size])
    if stored != actual:
        raise CodecError(
            f"corrupt Tandem payload: CRC32 mismatch ({actual:#010x} != {stored:#010x})"
        )


def _parse_header(view: memoryview, header_end: int) -> dict[str, Any]:
    """Decode and structurally validate the header JSON.

    A header that does not parse is more often a flipped bit than a buggy writer, so the CRC
    is consulted first to report "corrupt" rather than a misleading JSON error.
    """
    try:
        header = json.loads(
            bytes(view[_FIXED.size : header_end]).decode("utf-8"),
            parse_constant=_reject_constant,
        )
        return _validate_header(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if len(view) >= header_end + _CRC.size:
            _check_crc(view)
        if isinstance(exc, CodecError):
            raise
        raise CodecError(f"bad Tandem header JSON: {exc}") from exc


def _reject_constant(name: str) -> None:
    raise CodecError(f"bad Tandem header JSON: non-standard constant {name}")


def _validate_header(header: Any) -> dict[str, Any]:
    if not isinstance(header, dict) or set(header) != {"meta", "blobs"}:
        raise CodecError("bad Tandem header: expected an object with keys 'meta' and 'blobs'")
    if not isinstance(header["meta"], dict):
        raise CodecError("bad Tandem header: 'meta' must be an object")
    if not isinstance(header["blobs"], list):
        raise CodecError("bad Tandem header: 'blobs' must be a list")
    names: set[str] = set()
    for i, entry in enumerate(header["blobs"]):
        if not isinstance(entry, dict) or set(entry) != {"name", "offset", "nbytes"}:
            raise CodecError(f"bad Tandem header: blob entry {i} must have name, offset, nbytes")
        name, offset, nbytes = entry["name"], entry["offset"], entry["nbytes"]
        if not isinstance(name, str):
            raise CodecError(f"bad Tandem header: blob entry {i} name must be a string")
        if name in names:
            raise CodecError(f"bad Tandem header: duplicate blob name {name!r}")
        names.add(name)
        for key, value in (("offset", offset), ("nbytes", nbytes)):
            # bool is an int subclass; true/false in the JSON is a writer bug, not a number.
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CodecError(
                    f"bad Tandem header: blob {name!r} {key} must be a non-negative integer"
                )
    return header


def _check_blob_ranges(entries: list[dict[str, Any]]) -> None:
    """Blobs must not overlap (bounds were already enforced by the exact-length check)."""
    spans = sorted((e["offset"], e["offset"] + e["nbytes"], e["name"]) for e in entries)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CodecError(f"bad Tandem header: blobs {name_a!r} and {name_b!r} overlap")

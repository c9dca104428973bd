"""The SpectroStream bitstream: a versioned, checksummed file of codec codes.

A file holds the codes of one encoded recording, plus what a decoder needs
to restore it (codec and original sample rates, channel counts, length) and
the id of the model that made them. Every byte is covered by a CRC32, the
layout is fully determined by the header, and a reader raises
`BitstreamError` on any file it cannot trust instead of returning garbage.
The byte layout is documented in docs/bitstream.md.

  header = bitstream.Header(channels=2, levels=24, bits=10,
                            original_length=n, original_sample_rate=44100,
                            original_channels=2, model_id=digest)
  bitstream.write('song.sps', header, codes)      # int [frames, levels]
  header, codes = bitstream.read('song.sps', expected_model_id=digest)
"""

from collections.abc import Iterator, Sequence
import dataclasses
import math
import operator
import os
import struct
from typing import Any
import zlib

import numpy as np

from spectrostream_jax import files

MAGIC = b'\x89SPS\r\n\x1a\n'
VERSION = 1
BLOCK_TAG = b'SPSB'
INDEX_TAG = b'SPSI'
FOOTER_TAG = b'SPSF'

MAX_LEVELS = 64
MAX_BITS = 16
MAX_BLOCK_FRAMES = 4096
DEFAULT_BLOCK_FRAMES = 250
MODEL_ID_BYTES = 32
# Written as the frame count until close(), so an unfinished file is refused.
UNFINISHED = 0xFFFFFFFF
MAX_FRAMES = UNFINISHED - 1

# Header fields after the magic, in file order; the CRC32 follows them.
_HEADER = struct.Struct('<8sHBBHHIIIIQHH32s')
_CRC = struct.Struct('<I')
HEADER_SIZE = _HEADER.size + _CRC.size  # 80
_BLOCK_HEAD = struct.Struct('<4sII')  # tag, first frame, frame count
_INDEX_HEAD = struct.Struct('<4sI')  # tag, block count
_INDEX_ENTRY = struct.Struct('<QII')  # offset, first frame, frame count
_FOOTER_HEAD = struct.Struct('<4sQ')  # tag, index offset
FOOTER_SIZE = _FOOTER_HEAD.size + _CRC.size  # 16


class BitstreamError(ValueError):
  """A bitstream file or its contents are invalid; the message says why."""


def _int(name: str, value: Any) -> int:
  if isinstance(value, bool):
    raise BitstreamError(f'invalid header: {name} must be an int, got bool')
  try:
    return operator.index(value)
  except TypeError:
    raise BitstreamError(
      f'invalid header: {name} must be an int, got {type(value).__name__}'
    ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Header:
  """What a decoder needs besides the codes; all fields are ints but model_id.

  `frame_count` is set by the writer (the value given to `Writer` is
  ignored). `original_length` counts samples per channel at
  `original_sample_rate`, so the CLI can resample and trim back to the input.
  """

  channels: int
  levels: int
  bits: int
  original_length: int
  original_sample_rate: int
  original_channels: int
  model_id: bytes
  sample_rate: int = 48000
  samples_per_frame: int = 1920
  lookahead_frames: int = 0
  frame_count: int = 0
  block_frames: int = DEFAULT_BLOCK_FRAMES

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name != 'model_id':
        object.__setattr__(self, f.name, _int(f.name, getattr(self, f.name)))
    if not isinstance(self.model_id, bytes | bytearray | memoryview):
      raise BitstreamError(
        'invalid header: model_id must be bytes, got '
        f'{type(self.model_id).__name__}'
      )
    object.__setattr__(self, 'model_id', bytes(self.model_id))
    limits = {
      'channels': (1, 2),
      'levels': (1, MAX_LEVELS),
      'bits': (1, MAX_BITS),
      'original_length': (0, 2**64 - 1),
      'original_sample_rate': (1, 2**32 - 1),
      'original_channels': (1, 2**16 - 1),
      'sample_rate': (1, 2**32 - 1),
      'samples_per_frame': (1, 2**32 - 1),
      'lookahead_frames': (0, 2**16 - 1),
      'frame_count': (0, MAX_FRAMES),
      'block_frames': (1, MAX_BLOCK_FRAMES),
    }
    for name, (lo, hi) in limits.items():
      value = getattr(self, name)
      if not lo <= value <= hi:
        raise BitstreamError(
          f'invalid header: {name} is {value}, must be in {lo}..{hi}'
        )
    if len(self.model_id) != MODEL_ID_BYTES:
      raise BitstreamError(
        f'invalid header: model_id has {len(self.model_id)} bytes, '
        f'must be {MODEL_ID_BYTES} (a SHA-256 digest)'
      )

  @property
  def codebook_size(self) -> int:
    return 1 << self.bits

  @property
  def frame_rate(self) -> float:
    """Code frames per second (25.0 for the production codec)."""
    return self.sample_rate / self.samples_per_frame

  @property
  def duration_seconds(self) -> float:
    return self.frame_count * self.samples_per_frame / self.sample_rate

  @property
  def kbps(self) -> float:
    return self.levels * self.bits * self.frame_rate / 1000

  @property
  def num_blocks(self) -> int:
    return -(-self.frame_count // self.block_frames)


def describe(header: Header) -> dict[str, Any]:
  """Plain, JSON-ready facts about a file, for `spectrostream info`."""
  return {
    'format_version': VERSION,
    'model_id': header.model_id.hex(),
    'sample_rate': header.sample_rate,
    'channels': header.channels,
    'levels': header.levels,
    'bits': header.bits,
    'codebook_size': header.codebook_size,
    'samples_per_frame': header.samples_per_frame,
    'frame_rate': header.frame_rate,
    'frames': header.frame_count,
    'duration_seconds': header.duration_seconds,
    'kbps': header.kbps,
    'lookahead_frames': header.lookahead_frames,
    'block_frames': header.block_frames,
    'blocks': header.num_blocks,
    'original_length': header.original_length,
    'original_sample_rate': header.original_sample_rate,
    'original_channels': header.original_channels,
    'original_duration_seconds': (
      header.original_length / header.original_sample_rate
    ),
  }


def seconds_to_frame(header: Header, seconds: float) -> int:
  """The frame that holds time `seconds` (rounded to a sample, then floored).

  Not clamped to the file: `read_frames` says when it is past the end.
  """
  if not math.isfinite(seconds) or seconds < 0:
    raise BitstreamError(f'time must be finite and >= 0, got {seconds}')
  return round(seconds * header.sample_rate) // header.samples_per_frame


def _check_length(header: Header) -> None:
  """The original recording must fit in the coded frames."""
  coded = header.frame_count * header.samples_per_frame
  # original_length / original_rate <= coded / codec_rate, in integers.
  if (
    header.original_length * header.sample_rate
    > coded * header.original_sample_rate
  ):
    raise BitstreamError(
      f'invalid header: original length {header.original_length} samples at '
      f'{header.original_sample_rate} Hz is longer than {header.frame_count} '
      f'frames of {header.samples_per_frame} samples at {header.sample_rate} Hz'
    )


def _pack_header(header: Header, frame_count: int) -> bytes:
  body = _HEADER.pack(
    MAGIC,
    VERSION,
    header.channels,
    header.bits,
    header.levels,
    header.original_channels,
    header.sample_rate,
    header.samples_per_frame,
    header.original_sample_rate,
    frame_count,
    header.original_length,
    header.block_frames,
    header.lookahead_frames,
    header.model_id,
  )
  return body + _CRC.pack(zlib.crc32(body))


def _payload_size(header: Header, frames: int) -> int:
  return -(-frames * header.levels * header.bits // 8)


def _block_size(header: Header, frames: int) -> int:
  return _BLOCK_HEAD.size + _payload_size(header, frames) + _CRC.size


def _block_layout(header: Header) -> list[tuple[int, int, int]]:
  """(offset, first frame, frame count) of every block, from the header."""
  out = []
  offset = HEADER_SIZE
  for first in range(0, header.frame_count, header.block_frames):
    n = min(header.block_frames, header.frame_count - first)
    out.append((offset, first, n))
    offset += _block_size(header, n)
  return out


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
  """[n, levels] codes -> bits, MSB first, row-major, zero-padded to a byte."""
  wide = codes.astype('>u2').reshape(-1, 1).view(np.uint8)
  allbits = np.unpackbits(wide, axis=1)[:, 16 - bits :]
  return np.packbits(allbits.reshape(-1)).tobytes()


def _unpack_codes(
  payload: bytes, frames: int, levels: int, bits: int
) -> np.ndarray | None:
  """Inverse of _pack_codes; None when the padding bits are not zero."""
  count = frames * levels
  allbits = np.unpackbits(np.frombuffer(payload, np.uint8))
  if allbits[count * bits :].any():
    return None
  wide = np.zeros((count, 16), np.uint8)
  wide[:, 16 - bits :] = allbits[: count * bits].reshape(count, bits)
  values = np.packbits(wide, axis=1).view('>u2').reshape(frames, levels)
  return values.astype(np.int32)


def _check_codes(codes: Any, header: Header) -> np.ndarray:
  codes = np.asarray(codes)
  if not np.issubdtype(codes.dtype, np.integer):
    raise BitstreamError(f'codes must be integers, got {codes.dtype}')
  if codes.ndim != 2 or codes.shape[1] != header.levels:
    raise BitstreamError(
      f'codes must have shape [frames, {header.levels}], got '
      f'{list(codes.shape)}'
    )
  if codes.size and (
    codes.min() < 0 or int(codes.max()) >= header.codebook_size
  ):
    raise BitstreamError(f'codes out of range for {header.bits} bits')
  return codes.astype(np.uint16)


class Writer:
  """Writes a file block by block; the output appears only on close().

  Memory is bounded by one block of codes plus one index entry per block.
  The file is built in a temp file next to `path` and renamed over it once
  complete and fsynced, so a crash or an exception never leaves a partial or
  clobbered output. Use as a context manager; an exception inside the
  `with` block discards everything.
  """

  def __init__(self, path: str | os.PathLike, header: Header):
    if not isinstance(header, Header):
      raise BitstreamError(f'header must be a Header, got {type(header)}')
    self.path = os.fspath(path)
    if os.path.isdir(self.path):
      raise BitstreamError(f'cannot write {self.path}: it is a directory')
    self._header = dataclasses.replace(header, frame_count=0)
    self._frames = 0
    self._pending: list[np.ndarray] = []
    self._pending_frames = 0
    self._index: list[tuple[int, int, int]] = []
    self._offset = HEADER_SIZE
    self._closed = self._renamed = False
    self._temp = files.temp_name(self.path)
    self._file = open(self._temp, 'xb')  # noqa: SIM115 (closed in close()).
    try:
      self._file.write(_pack_header(self._header, UNFINISHED))
    except BaseException:
      self.abort()
      raise

  @property
  def header(self) -> Header:
    """The header as it stands: frame_count counts the frames appended."""
    return dataclasses.replace(self._header, frame_count=self._frames)

  def append(self, codes: Any) -> None:
    """Adds int codes [frames, levels] (any number of frames, even 0)."""
    if self._closed:
      raise BitstreamError('writer is closed')
    codes = _check_codes(codes, self._header)
    if self._frames + len(codes) > MAX_FRAMES:
      raise BitstreamError(f'too many frames (at most {MAX_FRAMES})')
    block = self._header.block_frames
    pos = 0
    while pos < len(codes):
      take = min(block - self._pending_frames, len(codes) - pos)
      self._pending.append(codes[pos : pos + take])
      self._pending_frames += take
      self._frames += take
      pos += take
      if self._pending_frames == block:
        self._emit_block()

  def set_original_length(self, samples: int) -> None:
    """Sets the input length once it is known: some decoders (Ogg Opus,
    MP3) only estimate it up front. Checked again on close()."""
    if self._closed:
      raise BitstreamError('writer is closed')
    self._header = dataclasses.replace(self._header, original_length=samples)

  def _emit_block(self) -> None:
    codes = np.concatenate(self._pending)
    first = self._frames - len(codes)
    head = _BLOCK_HEAD.pack(BLOCK_TAG, first, len(codes))
    body = head + _pack_codes(codes, self._header.bits)
    self._file.write(body + _CRC.pack(zlib.crc32(body)))
    self._index.append((self._offset, first, len(codes)))
    self._offset += len(body) + _CRC.size
    self._pending = []
    self._pending_frames = 0

  def close(self) -> None:
    """Writes the index and footer, fsyncs and renames onto the output."""
    if self._closed:
      return
    try:
      header = self.header
      _check_length(header)
      if self._pending_frames:
        self._emit_block()
      index = _INDEX_HEAD.pack(INDEX_TAG, len(self._index))
      index += b''.join(_INDEX_ENTRY.pack(*entry) for entry in self._index)
      footer = _FOOTER_HEAD.pack(FOOTER_TAG, self._offset)
      self._file.write(index + _CRC.pack(zlib.crc32(index)))
      self._file.write(footer + _CRC.pack(zlib.crc32(footer)))
      self._file.seek(0)
      self._file.write(_pack_header(header, header.frame_count))
      self._file.close()
      files.publish(self._temp, self.path, durable=True)
    except BaseException:
      self.abort()
      raise
    self._closed = self._renamed = True

  def abort(self) -> None:
    """Discards the temp file; the output path is left as it was."""
    if self._renamed:
      return
    self._closed = True
    self._file.close()
    self._temp.unlink(missing_ok=True)

  def __enter__(self) -> 'Writer':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write(path: str | os.PathLike, header: Header, codes: Any) -> Header:
  """Writes codes [frames, levels] in one go; returns the header written."""
  with Writer(path, header) as writer:
    writer.append(codes)
  return writer.header


# One model id, or several of which a file's must be one.
ExpectedIds = bytes | Sequence[bytes] | None


def _model_id_bytes(model_id: Any) -> bytes:
  if not isinstance(model_id, bytes | bytearray | memoryview):
    raise BitstreamError(
      f'expected_model_id must be bytes, got {type(model_id).__name__}'
    )
  if len(model_id) != MODEL_ID_BYTES:
    raise BitstreamError(
      f'expected_model_id has {len(model_id)} bytes, must be {MODEL_ID_BYTES}'
    )
  return bytes(model_id)


def _model_ids(value: Any) -> tuple[bytes, ...]:
  if isinstance(value, list | tuple):
    if not value:
      raise BitstreamError('expected_model_id is an empty sequence')
    return tuple(_model_id_bytes(v) for v in value)
  return (_model_id_bytes(value),)


class Reader:
  """Checks a file's header, index and footer on open; then reads blocks.

  Iterating yields the codes of each block, int32 [frames, levels], in
  order, each checked against its CRC; memory is bounded by one block.
  Any problem with the file raises `BitstreamError`.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    expected_model_id: ExpectedIds = None,
  ):
    """`expected_model_id`: refuse a file made by any other model (a
    sequence: by none of these models)."""
    self.path = os.fspath(path)
    expected = None
    if expected_model_id is not None:
      expected = _model_ids(expected_model_id)
    try:
      self._file = open(self.path, 'rb')  # noqa: SIM115 (closed in close()).
    except FileNotFoundError:
      raise BitstreamError(f'no such file: {self.path}') from None
    except IsADirectoryError:
      raise BitstreamError(f'{self.path} is a directory, not a file') from None
    except OSError as e:
      raise BitstreamError(f'cannot open {self.path}: {e.strerror}') from None
    try:
      self.header = self._read_header()
      if expected is not None and self.header.model_id not in expected:
        raise BitstreamError(
          'made by another model (model id '
          f'{self.header.model_id.hex()[:8]}… != expected '
          f'{" or ".join(e.hex()[:8] + "…" for e in expected)})'
        )
      self._layout = self._read_index()
    except BaseException:
      self._file.close()
      raise

  def _read_at(self, offset: int, size: int) -> bytes:
    try:
      self._file.seek(offset)
      data = self._file.read(size)
    except OSError as e:
      raise BitstreamError(f'cannot read {self.path}: {e.strerror}') from None
    if len(data) != size:
      raise BitstreamError('file is truncated')
    return data

  def _read_header(self) -> Header:
    try:
      data = self._file.read(HEADER_SIZE)
      self._size = os.fstat(self._file.fileno()).st_size
    except OSError as e:
      raise BitstreamError(f'cannot read {self.path}: {e.strerror}') from None
    if not data:
      raise BitstreamError('file is empty')
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
      raise BitstreamError('not a SpectroStream file (bad magic)')
    if len(data) < len(MAGIC) + 2:
      raise BitstreamError('file is truncated')
    (version,) = struct.unpack_from('<H', data, len(MAGIC))
    if version != VERSION:
      raise BitstreamError(
        f'unsupported version {version} (this library reads {VERSION})'
      )
    if len(data) < HEADER_SIZE:
      raise BitstreamError('file is truncated')
    (crc,) = _CRC.unpack_from(data, _HEADER.size)
    if zlib.crc32(data[: _HEADER.size]) != crc:
      raise BitstreamError('header CRC mismatch: file is corrupt')
    (
      _,
      _,
      channels,
      bits,
      levels,
      original_channels,
      sample_rate,
      samples_per_frame,
      original_sample_rate,
      frame_count,
      original_length,
      block_frames,
      lookahead_frames,
      model_id,
    ) = _HEADER.unpack_from(data)
    if frame_count == UNFINISHED:
      raise BitstreamError('file was not finished by its writer')
    header = Header(
      channels=channels,
      levels=levels,
      bits=bits,
      original_length=original_length,
      original_sample_rate=original_sample_rate,
      original_channels=original_channels,
      model_id=model_id,
      sample_rate=sample_rate,
      samples_per_frame=samples_per_frame,
      lookahead_frames=lookahead_frames,
      frame_count=frame_count,
      block_frames=block_frames,
    )
    _check_length(header)
    return header

  def _read_index(self) -> list[tuple[int, int, int]]:
    """Checks footer and index, which must match the header's layout."""
    header = self.header
    # Sizes first, by arithmetic: a header that claims billions of frames
    # must not make us build a huge layout before we see the file is short.
    full, rest = divmod(header.frame_count, header.block_frames)
    num_blocks = full + (rest > 0)
    index_offset = HEADER_SIZE + full * _block_size(header, header.block_frames)
    if rest:
      index_offset += _block_size(header, rest)
    index_size = _INDEX_HEAD.size + num_blocks * _INDEX_ENTRY.size + _CRC.size
    expected_size = index_offset + index_size + FOOTER_SIZE
    if self._size < expected_size:
      raise BitstreamError('file is truncated')
    if self._size > expected_size:
      raise BitstreamError(
        f'file has {self._size - expected_size} unexpected bytes at the end'
      )
    layout = _block_layout(header)
    footer = self._read_at(expected_size - FOOTER_SIZE, FOOTER_SIZE)
    tag, offset = _FOOTER_HEAD.unpack_from(footer)
    (crc,) = _CRC.unpack_from(footer, _FOOTER_HEAD.size)
    if tag != FOOTER_TAG or zlib.crc32(footer[: _FOOTER_HEAD.size]) != crc:
      raise BitstreamError('footer CRC mismatch: file is corrupt')
    if offset != index_offset:
      raise BitstreamError(
        f'footer points at the index at {offset}, expected {index_offset}'
      )
    data = self._read_at(index_offset, index_size)
    (crc,) = _CRC.unpack_from(data, index_size - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
      raise BitstreamError('index CRC mismatch: file is corrupt')
    tag, count = _INDEX_HEAD.unpack_from(data)
    if tag != INDEX_TAG:
      raise BitstreamError('index not found where the footer points')
    if count != len(layout):
      raise BitstreamError(
        f'index lists {count} blocks, header implies {len(layout)}'
      )
    for i, entry in enumerate(layout):
      got = _INDEX_ENTRY.unpack_from(
        data, _INDEX_HEAD.size + i * _INDEX_ENTRY.size
      )
      if got != entry:
        raise BitstreamError(
          f'index entry {i} is (offset, first frame, frames) = {got}, '
          f'expected {entry}'
        )
    if sum(n for *_, n in layout) != header.frame_count:
      raise BitstreamError('block frame counts do not add up to the header')
    return layout

  @property
  def num_blocks(self) -> int:
    return len(self._layout)

  def read_block(self, i: int) -> np.ndarray:
    """Codes of block `i`, int32 [frames, levels], checked against its CRC."""
    if not 0 <= i < len(self._layout):
      raise BitstreamError(f'no block {i} (file has {len(self._layout)})')
    header = self.header
    offset, first, frames = self._layout[i]
    data = self._read_at(offset, _block_size(header, frames))
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
      raise BitstreamError(f'block {i} CRC mismatch: file is corrupt')
    got = _BLOCK_HEAD.unpack_from(data)
    if got != (BLOCK_TAG, first, frames):
      raise BitstreamError(
        f'block {i} header is {got}, expected {(BLOCK_TAG, first, frames)}'
      )
    codes = _unpack_codes(
      data[_BLOCK_HEAD.size : -_CRC.size], frames, header.levels, header.bits
    )
    if codes is None:
      raise BitstreamError(f'block {i} has non-zero padding bits')
    return codes

  def __iter__(self) -> Iterator[np.ndarray]:
    total = 0
    for i in range(len(self._layout)):
      codes = self.read_block(i)
      total += len(codes)
      yield codes
    if total != self.header.frame_count:
      raise BitstreamError(
        f'blocks hold {total} frames, header says {self.header.frame_count}'
      )

  def read_frames(
    self, start_frame: int, num_frames: int | None = None
  ) -> np.ndarray:
    """Codes of frames [start, start + num), reading only the blocks needed.

    `num_frames=None` reads to the end. The range must lie in the file.
    """
    total = self.header.frame_count
    start = operator.index(start_frame)
    stop = total if num_frames is None else start + operator.index(num_frames)
    if not 0 <= start <= stop <= total:
      raise BitstreamError(
        f'frames {start}..{stop} are outside the file ({total} frames)'
      )
    block = self.header.block_frames
    parts = [np.zeros((0, self.header.levels), np.int32)]
    for i in range(start // block, -(-stop // block)):
      codes = self.read_block(i)
      first = i * block
      parts.append(codes[max(start - first, 0) : stop - first])
    return np.concatenate(parts)

  def read_all(self) -> np.ndarray:
    """All codes, int32 [frames, levels]."""
    parts = [np.zeros((0, self.header.levels), np.int32), *self]
    return np.concatenate(parts)

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> 'Reader':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close()


def read(
  path: str | os.PathLike, expected_model_id: ExpectedIds = None
) -> tuple[Header, np.ndarray]:
  """The header and all codes (int32 [frames, levels]) of a file."""
  with Reader(path, expected_model_id) as reader:
    return reader.header, reader.read_all()


def read_header(
  path: str | os.PathLike, expected_model_id: ExpectedIds = None
) -> Header:
  """The header, after checking header, index and footer (not the blocks)."""
  with Reader(path, expected_model_id) as reader:
    return reader.header


def read_frames(
  path: str | os.PathLike,
  start_frame: int,
  num_frames: int | None = None,
  expected_model_id: ExpectedIds = None,
) -> np.ndarray:
  """Codes of frames [start, start + num) (None: to the end), by seeking."""
  with Reader(path, expected_model_id) as reader:
    return reader.read_frames(start_frame, num_frames)

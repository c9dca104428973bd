"""The bitstream container: exact round trips, seeking, and refusing bad files.

A reader must raise BitstreamError, and nothing else, for any file it
cannot trust; the fuzz tests flip and cut bytes throughout real files.
"""

import hashlib
import os
import struct
import wave
import zlib

import numpy as np
import pytest

from spectrostream_jax import bitstream as bs
from spectrostream_jax.bitstream import BitstreamError

MODEL = hashlib.sha256(b'model A').digest()
OTHER = hashlib.sha256(b'model B').digest()


def make_header(levels=3, bits=6, block_frames=4, frames=11, **kw):
  """A header whose original length fits `frames` frames."""
  args = dict(
    channels=2,
    levels=levels,
    bits=bits,
    original_length=frames * 1920 * 44100 // 48000,
    original_sample_rate=44100,
    original_channels=2,
    model_id=MODEL,
    block_frames=block_frames,
  )
  args.update(kw)
  return bs.Header(**args)


def make_codes(frames, levels, bits, seed=0):
  return np.random.default_rng(seed).integers(0, 2**bits, (frames, levels))


def small_file(tmp_path, name='small.sps'):
  """11 frames in blocks of 4 (4, 4, 3): a few hundred bytes."""
  path = tmp_path / name
  codes = make_codes(11, 3, 6)
  bs.write(path, make_header(), codes)
  return path, codes


def assert_refused_or_same(path, codes):
  """A damaged file must raise BitstreamError or still decode exactly."""
  try:
    _, got = bs.read(path)
  except BitstreamError:
    return True
  np.testing.assert_array_equal(got, codes)
  return False


def recrc(data: bytes) -> bytes:
  """Replaces the trailing CRC32 of a structure with a valid one."""
  return data[:-4] + struct.pack('<I', zlib.crc32(data[:-4]))


# Round trips.


@pytest.mark.parametrize(
  'frames,levels,bits,block_frames',
  [
    (1, 1, 1, 250),
    (11, 3, 6, 4),
    (250, 64, 10, 250),
    (600, 64, 10, 250),
    (7, 5, 16, 3),
    (13, 2, 13, 5),
    (9, 7, 3, 1),
  ],
)
def test_round_trip_exact(tmp_path, frames, levels, bits, block_frames):
  path = tmp_path / 'codes.sps'
  header = make_header(levels, bits, block_frames, frames, lookahead_frames=1)
  codes = make_codes(frames, levels, bits, seed=frames)
  codes[0] = 2**bits - 1  # The extremes survive.
  codes[-1] = 0
  written = bs.write(path, header, codes)
  assert written.frame_count == frames
  got_header, got = bs.read(path, expected_model_id=MODEL)
  assert got_header == written
  assert got.dtype == np.int32 and got.shape == (frames, levels)
  np.testing.assert_array_equal(got, codes)
  assert bs.read_header(path) == written
  # The file is exactly as big as the layout says.
  sizes = [
    min(block_frames, frames - f) for f in range(0, frames, block_frames)
  ]
  blocks = sum(12 + -(-n * levels * bits // 8) + 4 for n in sizes)
  assert os.path.getsize(path) == 80 + blocks + 8 + 16 * len(sizes) + 4 + 16


def test_bit_packing_order_is_documented_one(tmp_path):
  """Codes are MSB first, row-major, zero-padded (docs/bitstream.md)."""
  path = tmp_path / 'two.sps'
  bs.write(path, make_header(2, 6, frames=1), [[1, 2]])
  data = path.read_bytes()
  assert data[:8] == b'\x89SPS\r\n\x1a\n'
  assert data[80:92] == b'SPSB' + struct.pack('<II', 0, 1)
  # 000001 000010 0000 -> 0000 0100 0010 0000.
  assert data[92:94] == b'\x04\x20'
  assert struct.unpack('<I', data[94:98])[0] == zlib.crc32(data[80:94])
  assert data[-16:-12] == b'SPSF'
  assert struct.unpack('<Q', data[-12:-4])[0] == 98


def test_accepts_any_integer_dtype(tmp_path):
  codes = make_codes(5, 2, 6)
  for dtype in (np.uint8, np.int16, np.uint16, np.int64, np.uint64):
    bs.write(
      tmp_path / 'a.sps', make_header(2, 6, frames=5), codes.astype(dtype)
    )
    np.testing.assert_array_equal(bs.read(tmp_path / 'a.sps')[1], codes)


def test_zero_frames_allowed_when_nothing_was_encoded(tmp_path):
  path = tmp_path / 'empty.sps'
  bs.write(path, make_header(frames=0), np.zeros((0, 3), np.int32))
  header, codes = bs.read(path)
  assert header.frame_count == 0 and codes.shape == (0, 3)
  assert bs.read_frames(path, 0, 0).shape == (0, 3)
  with bs.Reader(path) as reader:
    assert list(reader) == []


def test_zero_frames_refused_for_nonempty_original(tmp_path):
  path = tmp_path / 'empty.sps'
  header = make_header(frames=0, original_length=1)
  with pytest.raises(BitstreamError, match='original length'):
    bs.write(path, header, np.zeros((0, 3), np.int32))
  assert os.listdir(tmp_path) == []


def test_original_length_must_fit_frames(tmp_path):
  # 10 frames at 48 kHz = 0.4 s: 17640 samples at 44.1 kHz fit, 17641 not.
  header = make_header(frames=10, original_length=17640)
  bs.write(tmp_path / 'ok.sps', header, make_codes(10, 3, 6))
  with pytest.raises(BitstreamError, match='original length'):
    bs.write(
      tmp_path / 'bad.sps',
      make_header(frames=10, original_length=17641),
      make_codes(10, 3, 6),
    )
  assert os.listdir(tmp_path) == ['ok.sps']


def test_writer_ignores_given_frame_count(tmp_path):
  header = make_header(frames=11, frame_count=999)
  written = bs.write(tmp_path / 'a.sps', header, make_codes(11, 3, 6))
  assert written.frame_count == 11
  assert bs.read_header(tmp_path / 'a.sps').frame_count == 11


@pytest.mark.parametrize('seed', range(5))
def test_chunked_append_is_byte_identical(tmp_path, seed):
  rng = np.random.default_rng(seed)
  frames = int(rng.integers(0, 40))
  header = make_header(4, 7, int(rng.integers(1, 9)), frames)
  codes = make_codes(frames, 4, 7, seed)
  bs.write(tmp_path / 'one.sps', header, codes)
  with bs.Writer(tmp_path / 'many.sps', header) as writer:
    pos = 0
    while pos < frames:
      n = int(rng.integers(0, 12))
      writer.append(codes[pos : pos + n])
      pos += n
    assert writer.header.frame_count == frames
  one = (tmp_path / 'one.sps').read_bytes()
  assert (tmp_path / 'many.sps').read_bytes() == one


def test_reader_iterates_blocks_in_order(tmp_path):
  path, codes = small_file(tmp_path)
  with bs.Reader(path) as reader:
    blocks = list(reader)
    assert reader.num_blocks == 3
  assert [len(b) for b in blocks] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(blocks), codes)


# Seeking.


def test_read_frames_returns_exact_slices(tmp_path):
  path, codes = small_file(tmp_path)
  with bs.Reader(path) as reader:
    for start in range(12):
      for num in range(12 - start):
        np.testing.assert_array_equal(
          reader.read_frames(start, num), codes[start : start + num]
        )
      np.testing.assert_array_equal(reader.read_frames(start), codes[start:])
  np.testing.assert_array_equal(bs.read_frames(path, 5, 4), codes[5:9])


def test_read_frames_long_file(tmp_path):
  path = tmp_path / 'long.sps'
  codes = make_codes(1000, 64, 10)
  bs.write(path, make_header(64, 10, 250, 1000), codes)
  header = bs.read_header(path)
  start = bs.seconds_to_frame(header, 12.3)
  assert start == 307
  np.testing.assert_array_equal(
    bs.read_frames(path, start, 250, MODEL), codes[307:557]
  )
  np.testing.assert_array_equal(bs.read_frames(path, 999, 1), codes[999:])


@pytest.mark.parametrize('start,num', [(-1, 1), (0, 12), (11, 1), (5, -1)])
def test_read_frames_out_of_range(tmp_path, start, num):
  path, _ = small_file(tmp_path)
  with pytest.raises(BitstreamError, match='outside the file'):
    bs.read_frames(path, start, num)


def test_seconds_to_frame():
  header = make_header(frames=1000)
  assert bs.seconds_to_frame(header, 0) == 0
  assert bs.seconds_to_frame(header, 0.04) == 1
  assert bs.seconds_to_frame(header, 0.0399) == 0
  assert bs.seconds_to_frame(header, 10.0) == 250
  for bad in (-0.1, float('nan'), float('inf')):
    with pytest.raises(BitstreamError, match='finite'):
      bs.seconds_to_frame(header, bad)


def test_describe():
  header = make_header(64, 10, 250, frames=250, frame_count=250)
  info = bs.describe(header)
  assert info['kbps'] == 16.0
  assert info['frame_rate'] == 25.0
  assert info['duration_seconds'] == 10.0
  assert info['blocks'] == 1
  assert info['model_id'] == MODEL.hex()
  assert info['original_duration_seconds'] == pytest.approx(10.0)


# Damaged files. The every-byte loops are `slow`; the quick tier keeps the
# production-file truncations and trailing bytes.


@pytest.mark.slow
def test_fuzz_byte_flips_small_file(tmp_path):
  """Every byte of the file, three different flips each."""
  path, codes = small_file(tmp_path)
  data = path.read_bytes()
  rng = np.random.default_rng(0)
  bad = tmp_path / 'bad.sps'
  for pos in range(len(data)):
    for xor in rng.choice(np.arange(1, 256), 3, replace=False):
      damaged = bytearray(data)
      damaged[pos] ^= int(xor)
      bad.write_bytes(damaged)
      assert assert_refused_or_same(bad, codes), (pos, xor)


@pytest.mark.slow
def test_fuzz_byte_flips_production_shape(tmp_path):
  """Every header, index and footer byte and samples all through 3 blocks."""
  path = tmp_path / 'prod.sps'
  codes = make_codes(620, 64, 10)
  bs.write(path, make_header(64, 10, 250, 620), codes)
  data = path.read_bytes()
  rng = np.random.default_rng(1)
  index_at = struct.unpack('<Q', data[-12:-4])[0]
  positions = [*range(bs.HEADER_SIZE), *range(index_at, len(data))]
  positions += rng.integers(0, len(data), 300).tolist()
  bad = tmp_path / 'bad.sps'
  for pos in positions:
    damaged = bytearray(data)
    damaged[pos] ^= int(rng.integers(1, 256))
    bad.write_bytes(damaged)
    assert assert_refused_or_same(bad, codes), pos


@pytest.mark.slow
def test_fuzz_many_bytes_at_once(tmp_path):
  path, codes = small_file(tmp_path)
  data = path.read_bytes()
  rng = np.random.default_rng(2)
  bad = tmp_path / 'bad.sps'
  for _ in range(300):
    damaged = bytearray(data)
    for pos in rng.integers(0, len(data), int(rng.integers(2, 10))):
      damaged[pos] = int(rng.integers(0, 256))
    bad.write_bytes(damaged)
    assert_refused_or_same(bad, codes)


@pytest.mark.slow
def test_every_truncation_is_refused(tmp_path):
  path, _ = small_file(tmp_path)
  data = path.read_bytes()
  bad = tmp_path / 'cut.sps'
  for length in range(len(data)):
    bad.write_bytes(data[:length])
    with pytest.raises(BitstreamError):
      bs.read(bad)
    with pytest.raises(BitstreamError):
      bs.read_header(bad)


def test_truncations_of_production_file(tmp_path):
  path = tmp_path / 'prod.sps'
  bs.write(path, make_header(64, 10, 250, 620), make_codes(620, 64, 10))
  data = path.read_bytes()
  bad = tmp_path / 'cut.sps'
  lengths = np.random.default_rng(3).integers(0, len(data), 100).tolist()
  for length in [*lengths, len(data) - 1, 8, 79, 80, 81]:
    bad.write_bytes(data[:length])
    with pytest.raises(BitstreamError, match='truncated|empty'):
      bs.read(bad)


def test_trailing_bytes_refused(tmp_path):
  path, _ = small_file(tmp_path)
  with open(path, 'ab') as f:
    f.write(b'\0')
  with pytest.raises(BitstreamError, match='unexpected bytes at the end'):
    bs.read(path)


def test_clear_messages(tmp_path):
  path, _ = small_file(tmp_path)
  data = path.read_bytes()
  bad = tmp_path / 'bad.sps'

  bad.write_bytes(b'RIFF' + data[4:])
  with pytest.raises(BitstreamError, match=r'^not a SpectroStream file'):
    bs.read(bad)
  bad.write_bytes(data[:8] + struct.pack('<H', 7) + data[10:])
  with pytest.raises(
    BitstreamError, match=r'^unsupported version 7 \(this library reads 1\)$'
  ):
    bs.read(bad)
  damaged = bytearray(data)
  damaged[30] ^= 1
  bad.write_bytes(damaged)
  with pytest.raises(BitstreamError, match='^header CRC mismatch'):
    bs.read(bad)
  damaged = bytearray(data)
  damaged[bs.HEADER_SIZE + 2 * 25 + 13] ^= 1  # Payload of block 2 (of 0..2).
  bad.write_bytes(damaged)
  with pytest.raises(BitstreamError, match='^block 2 CRC mismatch'):
    bs.read(bad)
  # The header alone still reads, and so do frames outside block 2.
  assert bs.read_header(bad).frame_count == 11
  assert bs.read_frames(bad, 0, 8).shape == (8, 3)
  damaged = bytearray(data)
  damaged[-30] ^= 1
  bad.write_bytes(damaged)
  with pytest.raises(BitstreamError, match='^index CRC mismatch'):
    bs.read_header(bad)
  damaged = bytearray(data)
  damaged[-8] ^= 1
  bad.write_bytes(damaged)
  with pytest.raises(BitstreamError, match='^footer CRC mismatch'):
    bs.read_header(bad)


def test_consistent_crcs_but_inconsistent_contents(tmp_path):
  """Crafted files with valid CRCs are still checked field by field."""
  path, _ = small_file(tmp_path)
  data = path.read_bytes()
  bad = tmp_path / 'bad.sps'
  head, rest = data[:80], data[80:]

  def with_header(**fields):
    offsets = {'levels': (12, '<H'), 'bits': (11, '<B'), 'frames': (28, '<I')}
    h = bytearray(head)
    for name, value in fields.items():
      at, fmt = offsets[name]
      struct.pack_into(fmt, h, at, value)
    bad.write_bytes(recrc(bytes(h)) + rest)
    return bad

  with pytest.raises(BitstreamError, match='invalid header: levels is 0'):
    bs.read(with_header(levels=0))
  with pytest.raises(BitstreamError, match='invalid header: bits is 17'):
    bs.read(with_header(bits=17))
  with pytest.raises(BitstreamError, match='not finished'):
    bs.read(with_header(frames=0xFFFFFFFF))
  with pytest.raises(BitstreamError, match='original length'):
    bs.read(with_header(frames=0))
  with pytest.raises(BitstreamError, match='truncated'):
    bs.read(with_header(frames=12))
  with pytest.raises(BitstreamError, match='truncated'):
    bs.read(with_header(frames=4_000_000_000))  # No huge allocation first.
  with pytest.raises(BitstreamError, match='unexpected bytes'):
    bs.read(with_header(levels=2))

  # Block 1 claims to start at frame 5, with a valid block CRC.
  block1 = 80 + 25
  b = bytearray(data[block1 : block1 + 25])
  struct.pack_into('<I', b, 4, 5)
  bad.write_bytes(data[:block1] + recrc(bytes(b)) + data[block1 + 25 :])
  with pytest.raises(BitstreamError, match='block 1 header'):
    bs.read(bad)

  # Non-zero padding bits in the last block (3 frames x 3 x 6 = 54 bits).
  last = 80 + 50
  b = bytearray(data[last : last + 23])
  b[-5] |= 1
  bad.write_bytes(data[:last] + recrc(bytes(b)) + data[last + 23 :])
  with pytest.raises(BitstreamError, match='padding'):
    bs.read(bad)

  # The index lists a wrong first frame for block 2, with a valid CRC.
  index_at = struct.unpack('<Q', data[-12:-4])[0]
  idx = bytearray(data[index_at:-16])
  struct.pack_into('<I', idx, 8 + 2 * 16 + 8, 9)
  bad.write_bytes(data[:index_at] + recrc(bytes(idx)) + data[-16:])
  with pytest.raises(BitstreamError, match='index entry 2'):
    bs.read_header(bad)

  # The footer points elsewhere, with a valid CRC.
  foot = bytearray(data[-16:])
  struct.pack_into('<Q', foot, 4, index_at - 1)
  bad.write_bytes(data[:-16] + recrc(bytes(foot)))
  with pytest.raises(BitstreamError, match='footer points'):
    bs.read_header(bad)


# Foreign files and paths.


def test_foreign_files_refused(tmp_path):
  wav = tmp_path / 'a.wav'
  with wave.open(str(wav), 'wb') as w:
    w.setnchannels(2)
    w.setsampwidth(2)
    w.setframerate(48000)
    w.writeframes(b'\0' * 4 * 4800)
  with pytest.raises(BitstreamError, match='bad magic'):
    bs.read(wav)
  empty = tmp_path / 'empty.sps'
  empty.write_bytes(b'')
  with pytest.raises(BitstreamError, match='^file is empty$'):
    bs.read(empty)
  text = tmp_path / 'a.txt'
  text.write_text('hello\n')
  with pytest.raises(BitstreamError, match='bad magic'):
    bs.read_header(text)
  rng = np.random.default_rng(4)
  noise = tmp_path / 'noise.bin'
  for n in [1, 2, 7, 8, 9, 79, 80, 81, 500, 10000]:
    noise.write_bytes(rng.bytes(n))
    with pytest.raises(BitstreamError):
      bs.read(noise)
    # Random bytes after a good magic and version.
    noise.write_bytes(bs.MAGIC + b'\1\0' + rng.bytes(n))
    with pytest.raises(BitstreamError):
      bs.read(noise)


def test_bad_paths_refused(tmp_path):
  with pytest.raises(BitstreamError, match='is a directory'):
    bs.read(tmp_path)
  with pytest.raises(BitstreamError, match='^no such file: '):
    bs.read(tmp_path / 'missing.sps')
  with pytest.raises(BitstreamError, match='no such file'):
    bs.read_frames(tmp_path / 'missing.sps', 0, 1)


def test_model_id_checked(tmp_path):
  path, codes = small_file(tmp_path)
  np.testing.assert_array_equal(bs.read(path, MODEL)[1], codes)
  message = f'made by another model \\(model id {MODEL.hex()[:8]}'
  with pytest.raises(BitstreamError, match=message):
    bs.read(path, expected_model_id=OTHER)
  with pytest.raises(BitstreamError, match='another model'):
    bs.read_header(path, expected_model_id=OTHER)
  with pytest.raises(BitstreamError, match='another model'):
    bs.read_frames(path, 0, 1, expected_model_id=OTHER)
  with pytest.raises(BitstreamError, match='expected_model_id has 3 bytes'):
    bs.read(path, expected_model_id=b'abc')


# Writer failures leave nothing behind.


def test_exception_in_with_block_leaves_nothing(tmp_path):
  with (
    pytest.raises(RuntimeError),
    bs.Writer(tmp_path / 'a.sps', make_header()) as w,
  ):
    w.append(make_codes(9, 3, 6))  # Two blocks already on disk.
    assert len(os.listdir(tmp_path)) == 1  # The temp file.
    raise RuntimeError('boom')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  'codes,message',
  [
    (np.full((2, 3), 64), 'codes out of range for 6 bits'),
    (np.full((2, 3), -1), 'codes out of range for 6 bits'),
    (np.zeros((2, 4), np.int32), r'shape \[frames, 3\]'),
    (np.zeros((2,), np.int32), r'shape \[frames, 3\]'),
    (np.zeros((2, 3), np.float32), 'must be integers'),
  ],
)
def test_invalid_codes_leave_nothing(tmp_path, codes, message):
  with pytest.raises(BitstreamError, match=message):
    bs.write(tmp_path / 'a.sps', make_header(), codes)
  assert os.listdir(tmp_path) == []


def test_overwrite_only_on_successful_close(tmp_path):
  path = tmp_path / 'a.sps'
  path.write_bytes(b'previous')
  with pytest.raises(BitstreamError):
    bs.write(path, make_header(), np.full((11, 3), 99))
  with pytest.raises(ValueError), bs.Writer(path, make_header()) as w:
    w.append(make_codes(11, 3, 6))
    raise ValueError('stop')
  assert os.listdir(tmp_path) == ['a.sps']
  assert path.read_bytes() == b'previous'
  codes = make_codes(11, 3, 6)
  with bs.Writer(path, make_header()) as w:
    w.append(codes)
    assert path.read_bytes() == b'previous'  # Not before close.
  np.testing.assert_array_equal(bs.read(path)[1], codes)
  assert os.listdir(tmp_path) == ['a.sps']


def test_unfinished_temp_file_is_refused(tmp_path):
  writer = bs.Writer(tmp_path / 'a.sps', make_header())
  writer.append(make_codes(9, 3, 6))
  writer._file.flush()
  (temp,) = os.listdir(tmp_path)
  assert temp.startswith('.a.sps-tmp-') and temp.endswith('.sps')
  with pytest.raises(BitstreamError, match='not finished'):
    bs.read(tmp_path / temp)
  writer.abort()
  assert os.listdir(tmp_path) == []


def test_closed_writer_refuses_appends(tmp_path):
  writer = bs.Writer(tmp_path / 'a.sps', make_header(frames=0))
  writer.close()
  writer.close()  # Idempotent.
  writer.abort()  # Too late: the output stays.
  assert os.listdir(tmp_path) == ['a.sps']
  with pytest.raises(BitstreamError, match='closed'):
    writer.append(make_codes(1, 3, 6))


def test_writer_refuses_directory_target(tmp_path):
  with pytest.raises(BitstreamError, match='is a directory'):
    bs.Writer(tmp_path, make_header())


@pytest.mark.parametrize(
  'field,value,message',
  [
    ('levels', 0, 'levels is 0'),
    ('levels', 65, 'levels is 65'),
    ('bits', 0, 'bits is 0'),
    ('bits', 17, 'bits is 17'),
    ('channels', 3, 'channels is 3'),
    ('sample_rate', 0, 'sample_rate is 0'),
    ('original_sample_rate', 0, 'original_sample_rate is 0'),
    ('original_channels', 0, 'original_channels is 0'),
    ('samples_per_frame', 0, 'samples_per_frame is 0'),
    ('block_frames', 0, 'block_frames is 0'),
    ('original_length', -1, 'original_length is -1'),
    ('levels', 2.0, 'levels must be an int'),
    ('levels', True, 'levels must be an int'),
    ('model_id', MODEL[:31], 'model_id has 31 bytes'),
    ('model_id', MODEL.hex(), 'model_id must be bytes'),
  ],
)
def test_header_validation(field, value, message):
  with pytest.raises(BitstreamError, match=message):
    make_header(**{field: value})


def test_header_accepts_numpy_ints():
  header = make_header(levels=np.int64(3), bits=np.uint8(6))
  assert type(header.levels) is int and type(header.bits) is int

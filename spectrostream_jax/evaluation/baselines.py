"""Classic codecs of the ladder, in this process, through PyAV (FFmpeg).

The codecs a user would pick instead of a neural one: Opus (libopus), AAC
(FFmpeg's own AAC-LC encoder) and MP3 (LAME), encoded and decoded with
PyAV's codec contexts, without a container or a temporary file. PyAV's
wheels carry FFmpeg with libopus and LAME built in, so `pip install
'.[eval]'` is all they need.

Three things make the comparison fair:

- **Measured rate.** `kbps` counts the bytes of the codec's packets (no
  container), the same accounting as the neural codec's raw bits.
- **Aligned output.** Every encoder delays its output (Opus's pre-skip,
  AAC's 1024-sample priming, LAME's encoder and decoder delays). The
  encoder states that delay as its packets' timestamps, and the decoded
  frames are put back where their timestamps say; a residual lag of at
  most MAX_LAG samples (Opus's SILK resamplers) is then found by
  cross-correlation. Waveform metrics (SI-SDR, SNRs) are then meaningful.
- **A rate each codec can actually reach.** AAC and MP3 are coded at a
  lower sample rate when the bitrate is low (as LAME's command line does
  on its own), chosen per codec and rate (`rate_table`); a request below
  a codec's lowest workable rate runs at that lowest rate (`min_kbps`)
  rather than decoding to silence, MP3 snaps to its format's bitrates,
  and the ladder's notes say where.

Every result names the library and version that made it (`library`).
"""

import ctypes
import dataclasses
import fractions
import functools
import math
import re
from typing import NamedTuple

import numpy as np
import soxr

# Largest residual delay corrected by cross-correlation, in samples: the
# timestamps remove the stated delay exactly; Opus in SILK mode leaves a
# few samples more.
MAX_LAG = 16


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One classic codec, as FFmpeg names its encoder and decoder."""

  name: str  # the ladder's system name
  encoder: str
  decoder: str
  # (file name prefix, version function) of the codec library itself;
  # None when the codec is part of libavcodec.
  library: tuple[str, str] | None
  # The lowest target that still codes the music (not silence), in kbps.
  min_kbps: float
  # (highest kbps, sample rate): the first row whose bitrate is at least
  # the target gives the rate the codec runs at.
  rate_table: tuple[tuple[float, int], ...]
  # The only bitrates the format has, if it has a fixed set.
  steps: tuple[float, ...] = ()
  options: tuple[tuple[str, str], ...] = ()

  def sample_rate(self, kbps: float) -> int:
    for upper, rate in self.rate_table:
      if kbps <= upper:
        return rate
    return self.rate_table[-1][1]

  def target(self, kbps: float) -> float:
    """The rate the codec is asked for when `kbps` is requested.

    At least `min_kbps`; with fixed steps, the highest one not above
    `kbps`.
    """
    kbps = max(kbps, self.min_kbps)
    if self.steps:
      kbps = max([s for s in self.steps if s <= kbps] or [min(self.steps)])
    return kbps


# Measured on 10 s clips of music with PyAV 18.1 (FFmpeg 8.1, libopus
# 1.6.1, LAME 3.100); docs/evaluation.md has the figures.
BASELINES = {
  b.name: b
  for b in (
    # Hard CBR like the neural codec (VBR overshoots on dense music);
    # libopus defaults otherwise: complexity 10, 20 ms frames. Any target
    # under 1 kbps gives 3-byte packets, 1.2 kbps.
    Baseline(
      name='opus',
      encoder='libopus',
      decoder='libopus',
      library=('libopus', 'opus_get_version_string'),
      min_kbps=1.0,
      rate_table=((math.inf, 48_000),),
      options=(('vbr', 'off'),),
    ),
    # FFmpeg's AAC-LC encoder does not go below about 12.5 kbps in stereo
    # at 8 kHz (15 at 16 kHz, 18.5 at 24 kHz, 22.5 at 48 kHz, whatever
    # the target): each rate runs at the highest sample rate that holds it.
    Baseline(
      name='aac',
      encoder='aac',
      decoder='aac',
      library=None,
      min_kbps=12.0,
      rate_table=(
        (15.5, 8_000),
        (19.0, 16_000),
        (24.0, 24_000),
        (math.inf, 48_000),
      ),
    ),
    # LAME's own choices: 8 kHz (MPEG-2.5) up to 24 kbps, as the lame
    # command resamples; 12, 16 and 24 kHz above, and MPEG-1 at 48 kHz
    # from 80 kbps. The formats have fixed bitrates, the lowest 8 kbps.
    Baseline(
      name='mp3',
      encoder='libmp3lame',
      decoder='mp3float',
      library=('libmp3lame', 'get_lame_version'),
      min_kbps=8.0,
      rate_table=(
        (24.0, 8_000),
        (32.0, 12_000),
        (48.0, 16_000),
        (64.0, 24_000),
        (math.inf, 48_000),
      ),
      steps=(
        8,
        16,
        24,
        32,
        40,
        48,
        56,
        64,
        80,
        96,
        112,
        128,
        160,
        192,
        224,
        256,
        320,
      ),
    ),
  )
}


class Result(NamedTuple):
  audio: np.ndarray  # float32 [T, C] at the input's rate, as long as it
  kbps: float  # what the packets spent
  target_kbps: float  # what the encoder was asked for
  sample_rate: int  # the rate the codec ran at
  lag: int  # residual delay removed by cross-correlation, in samples
  library: str


def missing() -> str | None:
  """Why the baselines cannot run here, or None when they can."""
  try:
    import av  # noqa: F401
  except ImportError as e:
    return f'PyAV is not installed ({e}); pip install ".[eval]"'
  return None


def best_lag(reference: np.ndarray, decoded: np.ndarray, max_lag: int) -> int:
  """The delay in samples of `decoded` behind `reference` ([T, C] each).

  The lag in [-max_lag, max_lag] of the largest cross-correlation of the
  mono downmixes; 0 when the decoded audio is silent.
  """
  a = np.mean(reference, axis=1, dtype=np.float64)
  b = np.mean(decoded, axis=1, dtype=np.float64)
  if not np.any(b):
    return 0
  n = len(a) + len(b)
  corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
  lags = np.arange(-max_lag, max_lag + 1)
  # Index 0 of the first equal maximum: ties go to the smallest lag.
  return int(lags[np.argmax(corr[lags])])


def align(audio: np.ndarray, lag: int, length: int) -> np.ndarray:
  """[T, C] audio moved `lag` samples earlier, cut or zero-padded to length."""
  audio = audio[lag:] if lag >= 0 else np.pad(audio, ((-lag, 0), (0, 0)))
  if audio.shape[0] >= length:
    return audio[:length]
  return np.pad(audio, ((0, length - audio.shape[0]), (0, 0)))


def _loaded_library_version(prefix: str, function: str) -> str | None:
  """Asks the copy of a library this process has loaded for its version."""
  try:
    with open('/proc/self/maps') as f:
      paths = {line.split()[-1] for line in f if '/' in line}
  except OSError:
    return None
  for path in sorted(paths):
    if re.fullmatch(
      rf'{re.escape(prefix)}[-.\w]*\.so[.\d]*', path.split('/')[-1]
    ):
      try:
        get = getattr(ctypes.CDLL(path), function)
      except (OSError, AttributeError):
        continue
      get.restype = ctypes.c_char_p
      return get().decode()
  return None


@functools.cache
def library(name: str) -> str:
  """'<codec library> <version> (PyAV <v>, FFmpeg <v>)' of a baseline."""
  import av

  baseline = BASELINES[name]
  # Opening the codec loads its library, so that its version can be read.
  _encoder(baseline, 48_000, 2, 64.0)
  ffmpeg = f'PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}'
  if baseline.library is None:
    major, minor, micro = av.library_versions['libavcodec']
    avcodec = f'libavcodec {major}.{minor}.{micro}'
    return f'FFmpeg {baseline.encoder} ({avcodec}; {ffmpeg})'
  version = _loaded_library_version(*baseline.library)
  if version is None:
    version = f'{baseline.library[0]} (version unknown)'
  elif baseline.library[0] == 'libmp3lame':
    version = f'LAME {version}'
  return f'{version} ({ffmpeg})'


def _encoder(baseline: Baseline, rate: int, channels: int, kbps: float):
  import av

  codec = av.Codec(baseline.encoder, 'w')
  enc = av.CodecContext.create(codec)
  enc.sample_rate = rate
  enc.layout = 'stereo' if channels == 2 else 'mono'
  names = [f.name for f in codec.audio_formats or ()]
  floats = [f for f in ('fltp', 'flt') if f in names]
  if not floats:
    raise ValueError(f'{baseline.encoder} takes no float samples: {names}')
  enc.format = floats[0]
  enc.bit_rate = round(kbps * 1000)
  enc.time_base = fractions.Fraction(1, rate)
  enc.options = dict(baseline.options)
  enc.open()
  return enc


def _to_array(frame) -> np.ndarray:
  """A decoded frame as float32 [samples, channels]."""
  x = frame.to_ndarray()
  channels = frame.layout.nb_channels
  x = x.T if frame.format.is_planar else x.reshape(-1, channels)
  if np.issubdtype(x.dtype, np.integer):
    x = x / float(np.iinfo(x.dtype).max + 1)
  return np.asarray(x, np.float32)


def codec_roundtrip(
  wav: np.ndarray, rate: int, baseline: Baseline, kbps: float
) -> tuple[np.ndarray, int]:
  """Encodes and decodes [T, C] float32 at `rate`; (audio, packet bytes).

  The decoded audio is placed by its timestamps, which start at minus
  the encoder's delay, so that delay is removed: sample t of the output
  decodes sample t of the input.
  """
  import av

  t, channels = wav.shape
  enc = _encoder(baseline, rate, channels, kbps)
  x = np.ascontiguousarray(wav, np.float32)
  planar = enc.format.is_planar
  frame = av.AudioFrame.from_ndarray(
    x.T.copy() if planar else x.reshape(1, -1),
    format=enc.format.name,
    layout=enc.layout.name,
  )
  frame.sample_rate = rate
  frame.pts = 0
  frame.time_base = fractions.Fraction(1, rate)
  packets = enc.encode(frame) + enc.encode(None)
  size = sum(p.size for p in packets)

  dec = av.CodecContext.create(av.Codec(baseline.decoder, 'r'))
  dec.sample_rate = rate
  dec.layout = enc.layout.name
  if enc.extradata:
    dec.extradata = enc.extradata
  # The decoder must not drop the encoder's padding itself: some do (Opus's
  # pre-skip, LAME's stated delay) without moving the frame's timestamp.
  # Kept, it sits before time 0, where the timestamps put it.
  dec.flags2 |= int(av.codec.context.Flags2.skip_manual)
  out = np.zeros((t, channels), np.float32)
  position = None
  for packet in [*packets, None]:
    for decoded in dec.decode(packet):
      y = _to_array(decoded)
      if decoded.pts is not None:
        position = round(decoded.pts * decoded.time_base * rate)
      elif position is None:
        raise RuntimeError(f'{baseline.decoder} gave a frame without pts')
      lo, hi = max(position, 0), min(position + len(y), t)
      if hi > lo:
        out[lo:hi] = y[lo - position : hi - position]
      position += len(y)
  return out, size


def roundtrip(
  wav: np.ndarray, kbps: float, name: str, sample_rate: int = 48_000
) -> Result:
  """Codes float32 [T, C] `wav` with baseline `name` at `kbps` or its floor."""
  baseline = BASELINES[name]
  target = baseline.target(kbps)
  rate = baseline.sample_rate(target)
  x = wav if rate == sample_rate else soxr.resample(wav, sample_rate, rate)
  decoded, size = codec_roundtrip(
    np.asarray(x, np.float32), rate, baseline, target
  )
  if rate != sample_rate:
    decoded = align(soxr.resample(decoded, rate, sample_rate), 0, len(wav))
  lag = best_lag(wav, decoded, MAX_LAG)
  seconds = wav.shape[0] / sample_rate
  return Result(
    align(decoded, lag, wav.shape[0]).astype(np.float32),
    8 * size / seconds / 1000,
    target,
    rate,
    lag,
    library(name),
  )

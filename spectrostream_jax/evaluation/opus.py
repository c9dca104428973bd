"""Opus through opus-tools: the optional `opus-tools` baseline.

The ladder's own Opus rows come from libopus inside PyAV (baselines.py);
this runs the command-line tools instead, for comparison with figures
made with them.

A clip goes through `opusenc --hard-cbr --bitrate K` (constant
bitrate, like the neural codec: VBR overshoots its target by 25 % and
more on dense music; complexity 10, 20 ms frames) and
`opusdec --rate 48000 --float`. opusdec drops the encoder's pre-skip and
trims the end by the granule position; at low rates a delay of a few
samples remains (SILK's resamplers), so `roundtrip` shifts the output by
the lag, within ±MAX_LAG samples, that best correlates the mono
downmixes, then fixes its length to the input's. The binaries are looked
up on PATH at run time (Debian/Ubuntu: `apt-get install opus-tools`).

Opus is meant for 6 kbps and up in stereo. Below that libopus still
holds a hard CBR target down to about 2 kbps, at a quality that
collapses; at 1 kbps and under, each 20 ms packet is 2 bytes (0.8 kbps)
and decodes to silence (opusenc refuses targets under 0.5 kbps, so those
are sent as 0.5). The achieved rate is therefore measured from the Ogg
file, both for the audio packets alone (comparable with the neural
codec's raw bits) and for the whole file (headers and tags included).
"""

import dataclasses
import os
import shutil
import subprocess
import tempfile
from typing import NamedTuple

import numpy as np
import soundfile as sf

from spectrostream_jax.evaluation import baselines

# The lowest --bitrate opusenc accepts.
MIN_TARGET_KBPS = 0.5
# Largest decoder delay `roundtrip` corrects, in samples (2 ms): opusdec
# trims the pre-skip, but no timestamps tell what delay remains.
MAX_LAG = 96


@dataclasses.dataclass(frozen=True)
class Tools:
  opusenc: str
  opusdec: str
  version: str


class Result(NamedTuple):
  audio: np.ndarray  # float32 [T, C], as long as the input
  kbps: float  # Opus packets only
  file_kbps: float  # the whole Ogg file
  lag: int  # samples the decoded audio was shifted earlier by


def find() -> Tools | None:
  """opusenc and opusdec on PATH, or None when either is missing."""
  enc, dec = shutil.which('opusenc'), shutil.which('opusdec')
  if not (enc and dec):
    return None
  out = subprocess.run(
    [enc, '--version'], capture_output=True, text=True, check=False
  )
  version = (out.stdout.strip().splitlines() or ['opusenc'])[0]
  return Tools(enc, dec, version)


def _run(args: list[str]) -> None:
  done = subprocess.run(args, capture_output=True, text=True, check=False)
  if done.returncode:
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    reason = lines[-1] if lines else f'exit status {done.returncode}'
    raise RuntimeError(f'{os.path.basename(args[0])} failed: {reason}')


def packet_bytes(ogg: bytes) -> int:
  """Bytes of the audio packets of an Ogg Opus stream.

  Sums the packet sizes from each page's lacing table, leaving out the
  first two packets (the OpusHead and OpusTags headers).
  """
  sizes, packet, pos = [], 0, 0
  while pos < len(ogg):
    if ogg[pos : pos + 4] != b'OggS' or pos + 27 > len(ogg):
      raise ValueError(f'not an Ogg page at byte {pos}')
    segments = ogg[pos + 26]
    lacing = ogg[pos + 27 : pos + 27 + segments]
    for size in lacing:
      packet += size
      if size < 255:
        sizes.append(packet)
        packet = 0
    pos += 27 + segments + sum(lacing)
  return sum(sizes[2:])


def roundtrip(
  wav: np.ndarray, kbps: float, tools: Tools, sample_rate: int = 48_000
) -> Result:
  """Encodes float32 [T, C] `wav` at `kbps` and decodes it again."""
  with tempfile.TemporaryDirectory(prefix='spectrostream-opus-') as tmp:
    source = os.path.join(tmp, 'in.wav')
    encoded = os.path.join(tmp, 'out.opus')
    decoded = os.path.join(tmp, 'out.wav')
    sf.write(source, wav, sample_rate, subtype='FLOAT')
    # A fixed serial number makes the file, not just the audio, repeatable.
    _run(
      [
        tools.opusenc,
        '--quiet',
        '--serial',
        '0',
        '--hard-cbr',
        '--bitrate',
        f'{max(kbps, MIN_TARGET_KBPS):g}',
        source,
        encoded,
      ]
    )
    _run(
      [
        tools.opusdec,
        '--quiet',
        '--rate',
        str(sample_rate),
        '--float',
        encoded,
        decoded,
      ]
    )
    with open(encoded, 'rb') as f:
      ogg = f.read()
    audio, rate = sf.read(decoded, dtype='float32', always_2d=True)
  if rate != sample_rate or audio.shape[1] != wav.shape[1]:
    raise RuntimeError(
      f'opusdec gave {audio.shape[1]} channels at {rate} Hz, expected '
      f'{wav.shape[1]} at {sample_rate} Hz'
    )
  seconds = wav.shape[0] / sample_rate
  lag = baselines.best_lag(wav, audio, MAX_LAG)
  return Result(
    baselines.align(audio, lag, wav.shape[0]),
    8 * packet_bytes(ogg) / seconds / 1000,
    8 * len(ogg) / seconds / 1000,
    lag,
  )

"""Codec round trip on a generated clip: the smoke job of a fresh install.

    python -m spectrostream_jax.roundtrip --out /tmp/roundtrip.wav

Encodes a few seconds of generated stereo audio at the chosen bitrate and
decodes it again, printing a JSON summary. Without `--weights DIR` (holding
encoder.safetensors and soundstream.safetensors) the weights are random, so
the audio is noise: the point is that the whole path runs.
"""

import json
import os
import time

from absl import app
from absl import flags
import numpy as np
import soundfile as sf

from spectrostream_jax import files
from spectrostream_jax import inference
from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib

_PRESET = flags.DEFINE_string('preset', 'production', 'model preset')
_WEIGHTS = flags.DEFINE_string('weights', None, 'dir with the official files')
_KBPS = flags.DEFINE_float('kbps', 6.0, 'bitrate')
_SECONDS = flags.DEFINE_float('seconds', 4.0, 'clip length')
_OUT = flags.DEFINE_string('out', None, 'where to write the decoded wav')


def test_clip(seconds: float, sample_rate: int = 48_000) -> np.ndarray:
  """Stereo chord with a panned noise burst, float32 [1, T, 2]."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  rng = np.random.default_rng(0)
  left = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))
  right = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (164.8, 246.9, 392.0))
  burst = rng.standard_normal(t.size) * np.exp(-((t % 1.0) * 8.0)) * 0.1
  wav = np.stack([left + 0.7 * burst, right + 0.3 * burst], axis=-1)
  return wav[None].astype(np.float32)


def main(argv):
  del argv
  config = codec_lib.get_config(_PRESET.value)
  if _WEIGHTS.value:
    codec = inference.Codec.from_safetensors(
      os.path.join(_WEIGHTS.value, weights.ENCODER_FILE),
      os.path.join(_WEIGHTS.value, weights.SOUNDSTREAM_FILE),
      config,
    )
  else:
    codec = inference.Codec.random(config)
  wav = test_clip(_SECONDS.value, config.sample_rate)
  levels = codec.kbps_to_levels(_KBPS.value)
  start = time.perf_counter()
  codes = codec.encode(wav, levels)
  mid = time.perf_counter()
  out = codec.decode(codes)
  end = time.perf_counter()
  ref = wav[:, : out.shape[1]]
  snr = 10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-12))
  summary = {
    'preset': _PRESET.value,
    'weights': _WEIGHTS.value or 'random',
    'input_shape': list(wav.shape),
    'codes_shape': list(codes.shape),
    'output_shape': list(out.shape),
    'kbps': codec.levels_to_kbps(levels),
    'encode_s_incl_compile': round(mid - start, 3),
    'decode_s_incl_compile': round(end - mid, 3),
    'snr_db': round(float(snr), 2),
    'finite': bool(np.all(np.isfinite(out))),
  }
  if _OUT.value:
    with files.atomic_path(_OUT.value) as tmp:
      sf.write(tmp, out[0], config.sample_rate, subtype='FLOAT', format='WAV')
    summary['wrote'] = _OUT.value
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)

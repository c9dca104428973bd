"""Google's SpectroStream (Magenta RT) and ours, timed turn about.

Runs in a separate virtual environment that has the `magenta-rt` package
(it pins old versions of some of our dependencies) and sees ours through
the system site-packages:

    python -m venv --system-site-packages /tmp/mrt
    /tmp/mrt/bin/pip install magenta-rt==2.0.3
    /tmp/mrt/bin/python benchmarks/official_codec_speed.py --seconds 10

`benchmarks/codec_speed.py --official-python /tmp/mrt/bin/python` calls it.
Both models get the same random production-layout weights; the calls
alternate (official, ours, official, ...) so that load from other jobs on
the machine hits both alike. Prints JSON: best-of-N wall seconds of
whole-sequence encode (64-level codes) and decode, per implementation.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import magenta_rt  # noqa: F401  (installs the vendored sequence_layers)
from magenta_rt.jax import spectrostream
import numpy as np
import sequence_layers.jax as sl

from spectrostream_jax.models import codec


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--seconds', type=float, default=10.0)
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  config = codec.production()
  params = codec.init_params(config, jax.random.key(0))
  ours = codec.SpectroStream(config)
  official = (
    spectrostream.stft_spectrostream_40ms_generic_48khz_stereo_config().make()
  )
  samples = int(args.seconds * config.sample_rate)
  x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, samples, 2))
  wav = jnp.asarray(x, jnp.float32)

  def seq(values):
    return sl.Sequence(values, jnp.ones(values.shape[:2], bool))

  fns = {
    ('official', 'encode'): jax.jit(
      lambda p, w: (
        official.apply(
          {'params': p},
          seq(w),
          method=official.waveform_to_codes,
          training=False,
        ).values
      )
    ),
    ('official', 'decode'): jax.jit(
      lambda p, c: (
        official.apply(
          {'params': p},
          seq(c),
          method=official.codes_to_waveform,
          training=False,
        ).values
      )
    ),
    ('ours', 'encode'): jax.jit(
      lambda p, w: ours.apply({'params': p}, w, method=ours.encode)
    ),
    ('ours', 'decode'): jax.jit(
      lambda p, c: ours.apply({'params': p}, c, method=ours.decode)
    ),
  }
  codes = fns['ours', 'encode'](params, wav)
  official_codes = fns['official', 'encode'](params, wav)
  inputs = {'encode': wav, 'decode': codes}
  times = {key: [] for key in fns}
  for key, fn in fns.items():
    jax.block_until_ready(fn(params, inputs[key[1]]))  # Compile, warm up.
  for _ in range(args.repeats):
    for key, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, inputs[key[1]]))
      times[key].append(time.perf_counter() - start)
  result = {
    'implementation': 'magenta_rt 2.0.3 (sequence_layers)',
    'codes_equal': bool(jnp.all(codes == official_codes)),
  }
  for (impl, path), values in times.items():
    result.setdefault(impl, {})[path] = {'seconds': round(min(values), 4)}
  print(json.dumps(result))


if __name__ == '__main__':
  main()

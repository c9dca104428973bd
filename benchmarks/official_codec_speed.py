"""Times Google's own SpectroStream (Magenta RT) on the same job as ours.

Runs in a separate virtual environment that has the `magenta-rt` package
(it pins old versions of some of our dependencies):

    python -m venv --system-site-packages /tmp/mrt
    /tmp/mrt/bin/pip install magenta-rt==2.0.3
    /tmp/mrt/bin/python benchmarks/official_codec_speed.py --seconds 10

`benchmarks/codec_speed.py --official-python /tmp/mrt/bin/python` calls it
in the same run as our own measurement. Weights are random (the production
layout of shared/vectors/keys.json); speed does not depend on them. Prints
JSON with the best-of-N wall time of whole-sequence encode (64-level codes)
and decode.
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


def random_variables(model, wav):
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), wav, training=False)
  )
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda s: jnp.asarray(
      rng.standard_normal(s.shape) / np.sqrt(max(np.prod(s.shape[:-1]), 1)),
      s.dtype,
    ),
    shapes,
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--seconds', type=float, default=10.0)
  ap.add_argument('--repeats', type=int, default=3)
  args = ap.parse_args()
  model = (
    spectrostream.stft_spectrostream_40ms_generic_48khz_stereo_config().make()
  )
  samples = int(args.seconds * 48_000)
  x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, samples, 2))
  wav = sl.Sequence(jnp.asarray(x, jnp.float32), jnp.ones((1, samples), bool))
  variables = random_variables(model, wav)

  encode = jax.jit(
    lambda v, w: (
      model.apply(v, w, method=model.waveform_to_codes, training=False).values
    )
  )

  def decode_fn(v, codes):
    seq = sl.Sequence(codes, jnp.ones(codes.shape[:2], bool))
    return model.apply(
      v, seq, method=model.codes_to_waveform, training=False
    ).values

  decode = jax.jit(decode_fn)
  result = {
    'implementation': 'magenta_rt ' + magenta_rt.__version__
    if hasattr(magenta_rt, '__version__')
    else 'magenta_rt'
  }
  for name, fn, arg in (('encode', encode, wav), ('decode', decode, None)):
    if name == 'decode':
      arg = encode(variables, wav)
    jax.block_until_ready(fn(variables, arg))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(variables, arg))
      times.append(time.perf_counter() - start)
    result[name] = {'seconds': round(min(times), 4)}
  print(json.dumps(result))


if __name__ == '__main__':
  main()

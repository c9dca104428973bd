r"""Each precision mode against Google's outputs on the parity vectors.

    python benchmarks/precision_codes.py [--shared ../shared]

Regenerates the random production weights behind
shared/vectors/mrt_parity_A (Google's own code's outputs for them), then
runs `Codec` at every mode of `precision.MODES` on the backend JAX picks
(run it on a GPU for the TF32 figures; on a CPU, 'tensorfloat32' computes
float32). Per mode: the largest embedding and decoded-audio error and
its share of the vectors' tolerance, the frames whose 64 codes all equal
Google's, the first-n-level agreement, and the differing codes that are
not near-ties (a gap to the second-best code over 1e-4 on Google's
residual chain). docs/precision.md quotes it. Prints JSON.
"""

import argparse
import json
import pathlib
import runpy
import sys
import tempfile

import jax
import numpy as np

from spectrostream_jax import Codec
from spectrostream_jax import precision

# Tolerances of vectors/mrt_parity_A/README.md (max abs error).
TOLERANCE = {'emb': 1e-4, 'wav64': 2e-5, 'wav_unq': 2e-5}
NEAR_TIE = 1e-4
PREFIXES = (1, 4, 16, 64)


def load(weights: pathlib.Path, mode: str) -> Codec:
  return Codec.from_safetensors(
    str(weights / 'encoder.safetensors'),
    str(weights / 'soundstream.safetensors'),
    precision=mode,
  )


def measure(codec: Codec, ref: dict) -> dict:
  x = ref['wave_in']
  ours = {
    'emb': codec.embed(x),
    'wav64': codec.decode(ref['codes']),
    'wav_unq': codec.decode_embeddings(ref['emb']),
  }
  out = {}
  for name, tol in TOLERANCE.items():
    err = float(np.max(np.abs(ours[name] - ref[name])))
    out[f'{name}_max_abs_error'] = float(f'{err:.3g}')
    out[f'{name}_of_tolerance'] = round(err / tol, 3)
  same = (codec.encode(x) == ref['codes'])[0]  # [frames, levels]
  prefix = np.cumprod(same, axis=1).astype(bool)
  out['frames'] = int(same.shape[0])
  out['prefix_agreement'] = {
    str(n): round(float(prefix[:, n - 1].mean()), 4) for n in PREFIXES
  }
  # The first differing level of each frame; later levels follow from it.
  first = [np.flatnonzero(~row)[0] for row in same if not row.all()]
  gaps = [ref['rvq_gap'][0, f, level] for f, level in enumerate(first)]
  out['frames_differing'] = len(first)
  out['frames_differing_beyond_near_ties'] = int(
    sum(g > NEAR_TIE for g in gaps)
  )
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = pathlib.Path(__file__).resolve().parents[1]
  ap.add_argument('--shared', type=pathlib.Path, default=here.parent / 'shared')
  args = ap.parse_args(argv)
  vectors = args.shared / 'vectors'
  data = np.load(vectors / 'mrt_parity_A' / 'vectors.npz')
  ref = {k.removeprefix('L96000_'): data[k] for k in data.files}
  make = runpy.run_path(str(vectors / 'make_params.py'))
  result = {
    'benchmark': 'precision_codes',
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'jax': jax.__version__,
  }
  with tempfile.TemporaryDirectory() as tmp:
    weights = pathlib.Path(tmp)
    make['write_official_files'](make['make_params'](0), str(weights))
    for mode in precision.MODES:
      result[mode] = measure(load(weights, mode), ref)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())

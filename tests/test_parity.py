"""Parity with Google's own SpectroStream code (../shared/vectors)."""

import numpy as np
import pytest

from spectrostream_jax import Codec
from spectrostream_jax import signal

# Tolerances from vectors/mrt_parity_A/README.md (max abs error).
TOL = {
  'stft': 1e-4,
  'emb': 1e-4,
  'qemb64': 1e-5,
  'qemb16': 1e-5,
  'feat64': 2e-4,
  'feat_unq': 2e-4,
  'wav64': 2e-5,
  'wav16': 2e-5,
  'wav_unq': 2e-5,
}


@pytest.fixture(scope='module')
def vectors(shared_dir):
  data = np.load(shared_dir / 'vectors' / 'mrt_parity_A' / 'vectors.npz')
  return {k.removeprefix('L96000_'): data[k] for k in data.files}


@pytest.fixture(scope='module')
def codec(parity_weights):
  return Codec.from_safetensors(
    str(parity_weights / 'encoder.safetensors'),
    str(parity_weights / 'soundstream.safetensors'),
  )


@pytest.fixture(scope='module')
def ours(codec, vectors):
  """Every reference array recomputed by our code from the oracle inputs."""
  import jax

  from spectrostream_jax.models import quantizer

  m, p = codec._model, codec.params
  cb = p['quantizer']['embedding']
  codes = vectors['codes']
  decode_features = jax.jit(
    lambda e: m.apply({'params': p}, e, method=m.decode_features)
  )
  q64 = quantizer.decode(cb, codes)
  q16 = quantizer.decode(cb, codes[..., :16])
  out = {
    'stft': signal.stft(vectors['wave_in']),
    'emb': codec.embed(vectors['wave_in']),
    'codes': quantizer.encode(cb, vectors['emb'], 64),
    'qemb64': q64,
    'qemb16': q16,
    'feat64': decode_features(q64),
    'feat_unq': decode_features(vectors['emb']),
    'wav64': codec.decode(codes),
    'wav16': codec.decode(codes[..., :16]),
    'wav_unq': codec.decode_embeddings(vectors['emb']),
  }
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize('name', sorted(TOL))
def test_matches_official(ours, vectors, name):
  assert ours[name].shape == vectors[name].shape
  err = float(np.max(np.abs(ours[name] - vectors[name])))
  print(f'parity {name:9s} max|err| {err:.2e}  tolerance {TOL[name]:.0e}')
  assert err <= TOL[name], (name, err)


def test_codes_exact_from_oracle_embeddings(ours, vectors):
  mismatch = int(np.sum(ours['codes'] != vectors['codes']))
  print(f'parity codes     mismatches {mismatch} of {vectors["codes"].size}')
  assert mismatch == 0


def test_end_to_end_codes(codec, vectors):
  """Our own embeddings give the oracle codes except after near-ties."""
  codes = codec.encode(vectors['wave_in'], 64)
  differ = codes != vectors['codes']
  first = np.where(differ.any(-1), differ.argmax(-1), 64)
  for b, frame in zip(*np.nonzero(first < 64), strict=True):
    level = first[b, frame]
    assert vectors['rvq_gap'][b, frame, level] < 1e-3, (frame, level)
  print(f'parity end-to-end codes: {int(differ.sum())} of {differ.size} differ')


def test_alignment_and_shapes(vectors, codec):
  n = vectors['emb'].shape[1]
  assert codec.config.num_embeddings(96_000) == n == 50
  assert vectors['wav64'].shape[1] == codec.config.output_samples(n) == 94_080

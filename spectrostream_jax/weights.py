"""Reads and writes parameters in the official two-file safetensors layout.

`encoder.safetensors` holds `params/encoder/...`; `soundstream.safetensors`
holds `params/soundstream/decoder/...` and
`params/soundstream/quantizer/embedding` (docs/export.md). Keys are Flax paths
joined with `/`, so our parameter tree is the official one.
"""

from collections.abc import Mapping
import os

import jax
import numpy as np
import safetensors
import safetensors.numpy

from spectrostream_jax import files

ENCODER_FILE = 'encoder.safetensors'
SOUNDSTREAM_FILE = 'soundstream.safetensors'
# safetensors header metadata of the official files.
METADATA = {'format': 'flax'}


def flat_paths(tree: Mapping) -> dict:
  """{'encoder': {...}} -> {'encoder/base_conv_first/conv/kernel': leaf}."""
  return {
    '/'.join(str(k.key) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def flatten(params: Mapping) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flat_paths(params).items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def official_key(model_path: str) -> tuple[str, str]:
  """Model path (no 'params/' prefix) -> (file name, key in that file)."""
  top = model_path.split('/', 1)[0]
  if top == 'encoder':
    return ENCODER_FILE, f'params/{model_path}'
  if top in ('decoder', 'quantizer'):
    return SOUNDSTREAM_FILE, f'params/soundstream/{model_path}'
  raise KeyError(f'parameter {model_path!r} has no place in the official files')


def _read(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise ValueError(f'no such weights file: {path}')
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises several types for bad files.
    raise ValueError(f'{path} is not a readable safetensors file: {e}') from e


def load_official(
  encoder_path: str, soundstream_path: str, expected: Mapping
) -> dict:
  """Loads the two files into a `{'encoder', 'decoder', 'quantizer'}` tree.

  `expected` is a tree of shapes (e.g. from `jax.eval_shape` of init); any
  missing, unexpected or mis-shaped tensor is a ValueError naming it.
  """
  files = {
    ENCODER_FILE: _read(encoder_path),
    SOUNDSTREAM_FILE: _read(soundstream_path),
  }
  want = flat_paths(expected)
  flat, used = {}, set()
  for model_path, spec in want.items():
    fname, key = official_key(model_path)
    tensors = files[fname]
    if key not in tensors:
      raise ValueError(f'{fname} lacks {key}')
    value = tensors[key]
    if tuple(value.shape) != tuple(spec.shape):
      raise ValueError(
        f'{fname}:{key} has shape {tuple(value.shape)}, model wants '
        f'{tuple(spec.shape)} (wrong preset?)'
      )
    flat[model_path] = value.astype(np.float32)
    used.add((fname, key))
  extra = [
    f'{fname}:{key}'
    for fname, tensors in files.items()
    for key in tensors
    if (fname, key) not in used
  ]
  if extra:
    raise ValueError(f'unexpected tensors (wrong preset?): {extra[:3]}')
  return unflatten(flat)


def official_tensors(params: Mapping) -> dict[str, dict[str, np.ndarray]]:
  """{file name: {official key: array}}, encoder file first."""
  per_file = {ENCODER_FILE: {}, SOUNDSTREAM_FILE: {}}
  for model_path, value in flatten(params).items():
    fname, key = official_key(model_path)
    per_file[fname][key] = np.ascontiguousarray(value)
  return per_file


def official_bytes(params: Mapping) -> dict[str, bytes]:
  """{file name: bytes}: the files exactly as `save_official` writes them.

  The model id hashes these bytes, so both go through this one function.
  """
  return {
    fname: safetensors.numpy.save(tensors, metadata=METADATA)
    for fname, tensors in official_tensors(params).items()
  }


def save_official(params: Mapping, out_dir: str) -> list[str]:
  """Writes the two official files atomically; [encoder, soundstream]."""
  written = []
  for fname, data in official_bytes(params).items():
    path = os.path.join(out_dir, fname)
    files.write_atomic(path, data)
    written.append(path)
  return written

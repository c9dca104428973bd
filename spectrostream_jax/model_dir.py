"""The model directory: two official weight files plus config.json.

A directory written by `spectrostream-export` (docs/export.md) holds
`encoder.safetensors`, `soundstream.safetensors` and `config.json`, whose
`model_id` is the SHA-256 of the two files, so stale or swapped weights
are caught when it is read. A directory with the two files alone is the
official release, read as the production preset. A model fine-tuned with
its encoder and codebooks frozen records in `codes_compatible_with` the
model whose codes it shares (docs/finetune.md).
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, NamedTuple

from spectrostream_jax import files
from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib

CONFIG_FILE = 'config.json'
MODEL_FORMAT = 'spectrostream-model'
MODEL_FORMAT_VERSION = 1


def files_model_id(encoder_path: str, soundstream_path: str) -> str:
  """Hex SHA-256 of encoder.safetensors' bytes then soundstream's bytes."""
  digest = hashlib.sha256()
  for path in (encoder_path, soundstream_path):
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
  return digest.hexdigest()


def params_model_id(params) -> str:
  """The model id of the files `weights.save_official` writes for params."""
  data = weights.official_bytes(params)
  digest = hashlib.sha256(data[weights.ENCODER_FILE])
  digest.update(data[weights.SOUNDSTREAM_FILE])
  return digest.hexdigest()


def config_to_dict(config: codec_lib.CodecConfig) -> dict[str, Any]:
  """The full config, quantizer included, as JSON-ready nested values."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(values: Any) -> codec_lib.CodecConfig:
  """Inverse of `config_to_dict`; fields it lacks keep their defaults."""
  return _dataclass_from_json(codec_lib.CodecConfig, values, 'codec_config')


def _dataclass_from_json(cls, values: Any, where: str):
  if not isinstance(values, dict):
    raise ValueError(f'{where} must be a JSON object')
  defaults = cls()
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f'{where} has unknown fields {unknown}')
  kwargs = {}
  for name, value in values.items():
    default = getattr(defaults, name)
    if dataclasses.is_dataclass(default):
      kwargs[name] = _dataclass_from_json(
        type(default), value, f'{where}.{name}'
      )
    else:
      kwargs[name] = _field_from_json(value, default, f'{where}.{name}')
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{where} is not a valid config: {e}') from e


def _field_from_json(value: Any, default: Any, where: str) -> Any:
  """JSON lists back to (nested) int tuples; type-checked by the default."""
  if isinstance(value, list):
    value = _int_tuple(value, where)
  # A None default (e.g. dropout_levels) stands for an optional tuple.
  kind = tuple if default is None else type(default)
  if value is None and default is None:
    return value
  if kind is float and type(value) is int:
    return float(value)
  if type(value) is not kind:
    raise ValueError(
      f'{where} must be {kind.__name__}, got {type(value).__name__}'
    )
  return value


def _int_tuple(value: list, where: str) -> tuple:
  out = []
  for v in value:
    if isinstance(v, list):
      out.append(_int_tuple(v, where))
    elif type(v) is int:
      out.append(v)
    else:
      raise ValueError(f'{where} must hold integers, got {v!r}')
  return tuple(out)


_SHA256 = re.compile('[0-9a-f]{64}')


def read_model_config(path: str) -> dict[str, Any]:
  """config.json -> its fields, with 'config' the rebuilt CodecConfig."""
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not readable JSON: {e}') from e
  if not isinstance(meta, dict) or meta.get('format') != MODEL_FORMAT:
    raise ValueError(f'{path} is not a {MODEL_FORMAT} config')
  version = meta.get('format_version')
  if version != MODEL_FORMAT_VERSION:
    raise ValueError(
      f'{path} has format_version {version!r}; this library reads '
      f'{MODEL_FORMAT_VERSION}'
    )
  for key in ('model_id', 'codes_compatible_with'):
    value = meta.get(key)
    if key == 'codes_compatible_with' and value is None:
      continue
    if not (isinstance(value, str) and _SHA256.fullmatch(value)):
      raise ValueError(f'{path}: {key} must be a hex SHA-256')
  try:
    config = config_from_dict(meta.get('codec_config'))
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  return {**meta, 'config': config}


def model_config(
  config: codec_lib.CodecConfig,
  model_id: str,
  step: int | None,
  codes_compatible_with: str | None = None,
) -> dict[str, Any]:
  """The contents of config.json for a model with these weights."""
  preset = next(
    (name for name, make in codec_lib.PRESETS.items() if make() == config),
    None,
  )
  return {
    'format': MODEL_FORMAT,
    'format_version': MODEL_FORMAT_VERSION,
    'preset': preset,
    'model_id': model_id,
    'codes_compatible_with': codes_compatible_with,
    'step': step,
    'sample_rate': config.sample_rate,
    'num_channels': config.num_channels,
    'samples_per_frame': config.samples_per_frame,
    'frame_rate': config.frame_rate,
    'num_levels': config.quantizer.num_levels,
    'codebook_size': config.quantizer.codebook_size,
    'kbps_per_level': config.kbps_per_level,
    'lookahead': config.lookahead,
    'codec_config': config_to_dict(config),
  }


def write(
  directory: str,
  params,
  config: codec_lib.CodecConfig,
  step: int | None = None,
  codes_compatible_with: str | None = None,
) -> str:
  """Writes the weights and config.json into `directory`; the model id.

  Each file is replaced atomically; a whole directory that appears at
  once is `files.atomic_dir`'s job (export builds one around this).
  """
  enc, snd = weights.save_official(params, directory)
  model_id = files_model_id(enc, snd)
  files.write_atomic(
    os.path.join(directory, CONFIG_FILE),
    readable_json(model_config(config, model_id, step, codes_compatible_with)),
  )
  return model_id


def readable_json(value: Any) -> str:
  """JSON text with one key a line but flat lists on one line."""
  return _dumps(value) + '\n'


def _dumps(value: Any, indent: int = 0) -> str:
  pad = '  ' * (indent + 1)
  if isinstance(value, dict) and value:
    lines = [
      f'{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}' for k, v in value.items()
    ]
  elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
    lines = [f'{pad}{_dumps(v, indent + 1)}' for v in value]
  else:
    return json.dumps(value)
  body = ',\n'.join(lines) + '\n' + '  ' * indent
  return (
    ('{\n' if isinstance(value, dict) else '[\n')
    + body
    + ('}' if isinstance(value, dict) else ']')
  )


class Located(NamedTuple):
  """What a model directory holds, before its weights are read."""

  encoder_path: str
  soundstream_path: str
  config: codec_lib.CodecConfig
  model_id: str | None  # as config.json records it; None without one
  codes_compatible_with: str | None


def locate(directory: str) -> Located:
  """The files, config and recorded ids of a model directory.

  Without config.json the directory is the official release: the
  production preset and no recorded id.
  """
  if not os.path.isdir(directory):
    raise ValueError(f'no such model directory: {directory}')
  paths = []
  for name in (weights.ENCODER_FILE, weights.SOUNDSTREAM_FILE):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise ValueError(f'model directory {directory} lacks {name}')
    paths.append(path)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(config_path):
    return Located(*paths, codec_lib.production(), None, None)
  meta = read_model_config(config_path)
  return Located(
    *paths,
    meta['config'],
    meta['model_id'],
    meta.get('codes_compatible_with'),
  )

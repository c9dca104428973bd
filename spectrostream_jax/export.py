r"""`spectrostream-export`: a training run -> a self-contained model directory.

    spectrostream-export --workdir=/tmp/quickstart --out=/tmp/tiny_model

reads the generator's EMA parameters and the CodecConfig they were trained
with from the newest (or `--step`) checkpoint, and writes

    MODEL_DIR/config.json              config, preset, step, model_id,
                                       codes_compatible_with
    MODEL_DIR/encoder.safetensors      official layout (docs/export.md)
    MODEL_DIR/soundstream.safetensors
    MODEL_DIR/stablehlo/manifest.json  how to call the artifacts below
    MODEL_DIR/stablehlo/{encode,decode}_<frames>.jaxexport

The artifacts are `jax.export` serializations that run with jax and
safetensors alone; docs/export.md describes the calling convention.
`Codec.load(MODEL_DIR)` reads the directory back.
"""

import argparse
from collections.abc import Sequence
import os
import sys
from typing import Any

from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import commands
from spectrostream_jax import files
from spectrostream_jax import inference
from spectrostream_jax import model_dir as model_dir_lib
from spectrostream_jax import precision as precision_lib
from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.training import checkpoint

STABLEHLO_DIR = 'stablehlo'
MANIFEST_FILE = 'manifest.json'
MANIFEST_FORMAT = 'spectrostream-stablehlo'
MANIFEST_FORMAT_VERSION = 1
# 2 s blocks at 25 Hz.
DEFAULT_BLOCK_FRAMES = (50,)
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


# Reading a training run -----------------------------------------------------


def codec_config_from_record(record, where: str) -> codec_lib.CodecConfig:
  """The CodecConfig in a checkpoint's `config` item (`model.codec`)."""
  try:
    values = record['model']['codec']
  except (KeyError, TypeError) as e:
    raise ValueError(f'{where} records no model.codec config') from e
  try:
    return model_dir_lib.config_from_dict(values)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from e


# StableHLO artifacts --------------------------------------------------------


def _exported_functions(
  codec: inference.Codec,
  block_frames: Sequence[int],
  platforms: Sequence[str],
) -> dict[str, tuple[str, int, jax_export.Exported]]:
  """{name: (kind, frames, Exported)}: encode and decode per block size.

  Both take the merged weights dict keyed by official names, so a user
  passes what safetensors loaded. Traced in float32 at `highest`
  precision whatever `codec.precision` is, so the codes do not depend on
  an accelerator's default (TF32, bf16 passes; docs/precision.md).
  """
  c = codec.config
  model = codec_lib.SpectroStream(
    precision_lib.inference_config(c, precision_lib.DEFAULT)
  )
  flat_params = weights.flat_paths(codec.params)
  model_paths = {weights.official_key(p)[1]: p for p in flat_params}
  flat_spec = {
    key: jax.ShapeDtypeStruct(np.shape(flat_params[path]), jnp.float32)
    for key, path in model_paths.items()
  }

  def tree(flat):
    return weights.unflatten({model_paths[k]: v for k, v in flat.items()})

  def encode(flat, wav):
    levels = c.quantizer.num_levels
    return model.apply({'params': tree(flat)}, wav, levels, method=model.encode)

  def decode(flat, codes):
    return model.apply({'params': tree(flat)}, codes, method=model.decode)

  (batch,) = jax_export.symbolic_shape('batch')
  out = {}
  for frames in block_frames:
    wav = jax.ShapeDtypeStruct(
      (batch, frames * c.samples_per_frame, c.num_channels), jnp.float32
    )
    codes = jax.ShapeDtypeStruct(
      (batch, frames, c.quantizer.num_levels), jnp.int32
    )
    for kind, fn, arg in (('encode', encode, wav), ('decode', decode, codes)):
      program = jax.jit(precision_lib.traced(fn, precision_lib.DEFAULT))
      exported = jax_export.export(program, platforms=tuple(platforms))(
        flat_spec, arg
      )
      out[f'{kind}_{frames}'] = (kind, frames, exported)
  return out


def _shape(aval) -> list:
  """Static sizes as ints, the symbolic batch size by its name."""
  return [d if isinstance(d, int) else str(d) for d in aval.shape]


def _manifest(
  functions: dict[str, tuple[str, int, jax_export.Exported]], model_id: str
) -> dict[str, Any]:
  entries = {}
  for name, (kind, frames, exported) in functions.items():
    arg, result = exported.in_avals[-1], exported.out_avals[0]
    arg_name, result_name = (
      ('wav', 'codes') if kind == 'encode' else ('codes', 'wav')
    )
    entries[name] = {
      'file': f'{name}.jaxexport',
      'kind': kind,
      'frames': frames,
      'args': [
        {'name': 'weights', 'pytree': 'dict', 'dtype': 'float32'},
        {'name': arg_name, 'shape': _shape(arg), 'dtype': str(arg.dtype)},
      ],
      'results': [
        {
          'name': result_name,
          'shape': _shape(result),
          'dtype': str(result.dtype),
        }
      ],
    }
  some = next(iter(functions.values()))[-1]
  return {
    'format': MANIFEST_FORMAT,
    'format_version': MANIFEST_FORMAT_VERSION,
    'model_id': model_id,
    'jax_version': jax.__version__,
    'calling_convention_version': some.calling_convention_version,
    'platforms': list(some.platforms),
    'precision': 'highest',
    'call': (
      'jax.export.deserialize(open(file, "rb").read()).call(weights, x)'
    ),
    'weights': {
      'files': [weights.ENCODER_FILE, weights.SOUNDSTREAM_FILE],
      'argument': (
        'dict of every tensor of both files, keyed by its name in the file, '
        'as safetensors.numpy.load_file returns them, merged'
      ),
    },
    'functions': entries,
  }


# Writing a model directory --------------------------------------------------


def export_model(
  codec: inference.Codec,
  out_dir: str,
  *,
  step: int | None = None,
  block_frames: Sequence[int] = DEFAULT_BLOCK_FRAMES,
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
  overwrite: bool = False,
) -> str:
  """Writes `codec` as a model directory; returns its model_id.

  The directory is built next to `out_dir` and renamed into place, so a
  reader never sees half of it. An existing non-empty `out_dir` is
  replaced only with `overwrite`.
  """
  c = codec.config
  block_frames = list(block_frames)
  if not block_frames or len(set(block_frames)) != len(block_frames):
    raise ValueError(f'block_frames must be distinct sizes: {block_frames}')
  for frames in block_frames:
    if not isinstance(frames, int) or frames <= c.lookahead:
      raise ValueError(
        f'block_frames must be ints > {c.lookahead} (the decoder look-ahead),'
        f' got {frames!r}'
      )
  if not platforms:
    raise ValueError('platforms must name at least one platform')
  out_dir = os.path.abspath(out_dir)
  _check_out_dir(out_dir, overwrite)
  functions = _exported_functions(codec, block_frames, platforms)

  with files.atomic_dir(out_dir, overwrite=overwrite) as tmp:
    model_id = model_dir_lib.write(
      str(tmp), codec.params, c, step, codec.codes_compatible_with
    )
    hlo_dir = tmp / STABLEHLO_DIR
    hlo_dir.mkdir()
    manifest = _manifest(functions, model_id)
    for name, (*_, exported) in functions.items():
      (hlo_dir / manifest['functions'][name]['file']).write_bytes(
        exported.serialize()
      )
    (hlo_dir / MANIFEST_FILE).write_text(model_dir_lib.readable_json(manifest))
  return model_id


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.lexists(out_dir):
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
      raise ValueError(f'{out_dir} exists and is not a directory')
    if os.listdir(out_dir) and not overwrite:
      raise ValueError(f'{out_dir} is not empty; pass --overwrite to replace')


def export_workdir(
  workdir: str, out_dir: str, *, step: int | None = None, **kwargs
) -> tuple[str, int]:
  """A training workdir -> a model directory; (model_id, step exported)."""
  if not os.path.isdir(workdir):
    raise ValueError(f'no such workdir: {workdir}')
  params, record, step = checkpoint.restore_for_export(
    os.path.join(workdir, 'checkpoints'), step
  )
  where = f'checkpoint {step} of {workdir}'
  config = codec_config_from_record(record, where)
  try:
    codec = inference.Codec(params, config, record.get('codes_compatible_with'))
  except ValueError as e:
    raise ValueError(f'{where} does not fit its recorded CodecConfig') from e
  return export_model(codec, out_dir, step=step, **kwargs), step


# Command line ---------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  parser = commands.Parser(
    prog='spectrostream-export',
    description='Turns a spectrostream-train workdir into a model directory '
    '(docs/export.md).',
  )
  parser.add_argument(
    '--workdir', required=True, help='training run (its checkpoints/)'
  )
  parser.add_argument('--out', required=True, help='model directory to write')
  parser.add_argument(
    '--step', type=int, help='checkpoint step to export (default: newest)'
  )
  parser.add_argument(
    '--block-frames',
    type=int,
    nargs='+',
    default=list(DEFAULT_BLOCK_FRAMES),
    help='StableHLO block sizes in 40 ms frames (default: 50 = 2 s)',
  )
  parser.add_argument(
    '--platforms',
    nargs='+',
    default=list(DEFAULT_PLATFORMS),
    choices=('cpu', 'cuda', 'rocm', 'tpu'),
    help='platforms the StableHLO artifacts run on',
  )
  parser.add_argument(
    '--overwrite', action='store_true', help='replace a non-empty --out'
  )
  commands.add_verbosity(
    parser,
    quiet='print nothing on success',
    verbose="show JAX's and Orbax's log lines",
  )
  commands.add_version(parser, parser.prog)
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Console entry point; a user mistake exits 1 with a one-line reason."""
  args = _parser().parse_args(argv)
  logging.set_verbosity(logging.INFO if args.verbose else logging.ERROR)
  try:
    model_id, step = export_workdir(
      args.workdir,
      args.out,
      step=args.step,
      block_frames=args.block_frames,
      platforms=args.platforms,
      overwrite=args.overwrite,
    )
  # ImportError: jax.export needs the flatbuffers package to serialize.
  except (ValueError, OSError, ImportError) as e:
    sys.exit(f'spectrostream-export: error: {e}')
  if not args.quiet:
    print(f'exported step {step} to {os.path.abspath(args.out)}')
    print(f'model_id {model_id}')


if __name__ == '__main__':
  main()

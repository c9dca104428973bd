"""`spectrostream`: encode and decode audio files through the bitstream.

    spectrostream encode --model DIR song.flac song.sps --kbps 6
    spectrostream decode --model DIR song.sps song.wav
    spectrostream info song.sps
    spectrostream demo --model DIR song.flac

Files are processed block by block (`--block-seconds`) through the
streaming encoder and decoder, so memory does not grow with the length of
the input and the codes do not depend on the block size. Directories are
processed recursively. Every output is written under a temporary name and
renamed when complete.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import soundfile as sf
import soxr

from spectrostream_jax import bitstream
from spectrostream_jax import channels
from spectrostream_jax import demo
from spectrostream_jax import files
from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec

SUFFIX = '.sps'
# Samples read from a file per call: a fixed size, so the resampler sees
# the same chunks whatever the block size.
READ_SAMPLES = 1 << 16


class UserError(Exception):
  """A mistake in the command line or its inputs: one line, exit 1."""


def _load_codec(model_dir: str) -> Codec:
  try:
    return Codec.load(model_dir)
  except (ValueError, OSError) as e:
    raise UserError(f'cannot load model {model_dir}: {e}') from None


def _levels(codec: Codec, args) -> int:
  if args.levels is not None and args.kbps is not None:
    raise UserError('give --kbps or --levels, not both')
  if args.kbps is not None:
    try:
      return codec.kbps_to_levels(args.kbps)
    except ValueError as e:
      raise UserError(str(e)) from None
  levels = codec.num_levels if args.levels is None else args.levels
  if not 1 <= levels <= codec.num_levels:
    raise UserError(f'--levels must be in 1..{codec.num_levels}')
  return levels


def _block_frames(codec: Codec, seconds: float) -> int:
  if not seconds > 0:
    raise UserError(f'--block-seconds must be > 0, got {seconds}')
  return max(1, round(seconds * codec.config.frame_rate))


def _open_audio(path: pathlib.Path) -> sf.SoundFile:
  try:
    f = sf.SoundFile(str(path))
  except (sf.SoundFileError, OSError) as e:
    raise UserError(f'cannot read audio {path}: {e}') from None
  return f


def encode_file(
  codec: Codec,
  src: pathlib.Path,
  dst: pathlib.Path,
  levels: int,
  block_frames: int,
) -> bitstream.Header:
  """Streams `src` through the encoder into the bitstream file `dst`."""
  cfg = codec.config
  with _open_audio(src) as f:
    in_rate, in_channels = f.samplerate, f.channels
    header = bitstream.Header(
      channels=cfg.num_channels,
      levels=levels,
      bits=cfg.bits_per_level,
      original_length=0,
      original_sample_rate=in_rate,
      original_channels=in_channels,
      model_id=bytes.fromhex(codec.codes_id),
      sample_rate=cfg.sample_rate,
      samples_per_frame=cfg.samples_per_frame,
      lookahead_frames=cfg.lookahead,
    )
    resampler = None
    if in_rate != cfg.sample_rate:
      resampler = soxr.ResampleStream(
        in_rate, cfg.sample_rate, cfg.num_channels, dtype='float32'
      )
    enc = streaming.StreamingEncoder(
      codec, levels, frames_per_step=block_frames
    )
    with bitstream.Writer(dst, header) as writer:
      # Read to the end of the stream: for some formats (Ogg Opus, MP3)
      # the length in the file's header is only an estimate.
      done = 0
      while True:
        x = f.read(READ_SAMPLES, dtype='float32', always_2d=True)
        if not x.shape[0]:
          break
        done += x.shape[0]
        if not np.all(np.isfinite(x)):
          raise UserError(f'{src} contains NaN or Inf samples')
        x = channels.to_channels(x, cfg.num_channels)
        if resampler is not None:
          x = resampler.resample_chunk(x)
        writer.append(enc.push(x[None])[0])
      if not done:
        raise UserError(f'{src} has no audio samples')
      if resampler is not None:
        end = np.zeros((0, cfg.num_channels), np.float32)
        writer.append(
          enc.push(resampler.resample_chunk(end, last=True)[None])[0]
        )
      writer.set_original_length(done)
      # The decoder's look-ahead frames, so every input sample decodes.
      tail = np.zeros(
        (1, cfg.lookahead * cfg.samples_per_frame, cfg.num_channels),
        np.float32,
      )
      writer.append(enc.push(tail)[0])
      writer.append(enc.flush()[0])
    return writer.header


def decode_file(
  codec: Codec,
  src: pathlib.Path,
  dst: pathlib.Path,
  block_frames: int,
  subtype: str = 'FLOAT',
) -> bitstream.Header:
  """Decodes `src` to a WAV at its original rate, channels and length."""
  cfg = codec.config
  ids = {bytes.fromhex(codec.model_id), bytes.fromhex(codec.codes_id)}
  with bitstream.Reader(src, sorted(ids)) as reader:
    h = reader.header
    if (h.sample_rate, h.samples_per_frame, h.channels, h.bits) != (
      cfg.sample_rate,
      cfg.samples_per_frame,
      cfg.num_channels,
      cfg.bits_per_level,
    ) or h.levels > codec.num_levels:
      raise UserError(f'{src} was coded for a differently shaped model')
    out_channels = min(h.original_channels, 2)
    resampler = None
    if h.original_sample_rate != cfg.sample_rate:
      resampler = soxr.ResampleStream(
        cfg.sample_rate,
        h.original_sample_rate,
        cfg.num_channels,
        dtype='float32',
      )
    dec = streaming.StreamingDecoder(codec, frames_per_step=block_frames)
    written = 0
    with (
      files.atomic_path(dst) as tmp,
      sf.SoundFile(
        str(tmp),
        'w',
        h.original_sample_rate,
        out_channels,
        subtype=subtype,
        format='WAV',
      ) as out,
    ):
      for y, last in _decoded(reader, dec):
        if resampler is not None:
          y = resampler.resample_chunk(y, last=last)
        y = y[: h.original_length - written]
        out.write(channels.to_channels(y, out_channels))
        written += y.shape[0]
      if written < h.original_length:  # Resampler rounding: pad.
        pad = np.zeros((h.original_length - written, out_channels))
        out.write(pad.astype(np.float32))
    return h


def _decoded(reader, dec):
  """(audio, is_last) per block of `reader`, then the decoder's flush."""
  for block in reader:
    yield dec.push(block[None])[0], False
  yield dec.flush()[0], True


def _pairs(src: pathlib.Path, dst: pathlib.Path, to_suffix, want_src):
  """(input, output) pairs; a directory maps onto a directory tree."""
  if not src.exists():
    raise UserError(f'no such file or directory: {src}')
  if src.is_file():
    if dst.is_dir():
      return [(src, dst / to_suffix(src.name))]
    return [(src, dst)]
  found = sorted(p for p in src.rglob('*') if p.is_file() and want_src(p))
  if not found:
    raise UserError(f'no input files found under {src}')
  if dst.exists() and not dst.is_dir():
    raise UserError(f'{dst} must be a directory when the input is one')
  return [
    (p, dst / p.relative_to(src).parent / to_suffix(p.name)) for p in found
  ]


def _run_many(pairs, work, overwrite: bool, what: str) -> int:
  """Runs `work(src, dst)` per pair with a progress bar."""
  from rich.console import Console
  from rich.progress import Progress

  failures = 0
  console = Console(stderr=True)
  with Progress(console=console, disable=not console.is_terminal) as bar:
    task = bar.add_task(what, total=len(pairs))
    for src, dst in pairs:
      if dst.exists() and not overwrite:
        print(f'skipped {src}: {dst} exists (use --overwrite)', file=sys.stderr)
        failures += 1
      else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
          work(src, dst)
        except (UserError, ValueError, OSError, sf.SoundFileError) as e:
          print(f'failed {src}: {e}', file=sys.stderr)
          failures += 1
      bar.advance(task)
  done = len(pairs) - failures
  print(f'{what}: {done} of {len(pairs)} files ok', file=sys.stderr)
  return 1 if failures else 0


def _audio_suffix(p: pathlib.Path) -> bool:
  return p.suffix.lower() != SUFFIX and not p.name.startswith('.')


def cmd_encode(args) -> int:
  codec = _load_codec(args.model)
  levels = _levels(codec, args)
  frames = _block_frames(codec, args.block_seconds)
  pairs = _pairs(
    pathlib.Path(args.input),
    pathlib.Path(args.output),
    lambda name: pathlib.Path(name).stem + SUFFIX,
    _audio_suffix,
  )
  return _run_many(
    pairs,
    lambda s, d: encode_file(codec, s, d, levels, frames),
    args.overwrite,
    f'encode {codec.levels_to_kbps(levels):g} kbps',
  )


def cmd_decode(args) -> int:
  codec = _load_codec(args.model)
  frames = _block_frames(codec, args.block_seconds)
  pairs = _pairs(
    pathlib.Path(args.input),
    pathlib.Path(args.output),
    lambda name: pathlib.Path(name).stem + '.wav',
    lambda p: p.suffix.lower() == SUFFIX,
  )
  return _run_many(
    pairs,
    lambda s, d: decode_file(codec, s, d, frames, args.subtype),
    args.overwrite,
    'decode',
  )


def cmd_info(args) -> int:
  try:
    header = bitstream.read_header(args.input)
  except bitstream.BitstreamError as e:
    raise UserError(f'{args.input}: {e}') from None
  print(json.dumps(bitstream.describe(header), indent=2))
  return 0


def cmd_demo(args) -> int:
  codec = _load_codec(args.model)
  levels = _levels(codec, args)
  with _open_audio(pathlib.Path(args.input)) as f:
    n = min(f.frames, round(args.seconds * f.samplerate))
    x = f.read(n, dtype='float32', always_2d=True)
    rate = f.samplerate
  return demo.run(codec, levels, x, rate, args)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog='spectrostream', description='SpectroStream neural audio codec.'
  )
  sub = p.add_subparsers(dest='command', required=True)

  def common(q, levels=True):
    q.add_argument('--model', required=True, help='model directory')
    if levels:
      q.add_argument('--kbps', type=float, help='bitrate (0.25 per level)')
      q.add_argument('--levels', type=int, help='RVQ levels (default: all)')
    q.add_argument('--block-seconds', type=float, default=10.0)
    q.add_argument('--overwrite', action='store_true')

  e = sub.add_parser('encode', help='audio file(s) -> .sps bitstream(s)')
  common(e)
  e.add_argument('input')
  e.add_argument('output')
  d = sub.add_parser('decode', help='.sps bitstream(s) -> WAV file(s)')
  common(d, levels=False)
  d.add_argument('--subtype', default='FLOAT', help='WAV sample format')
  d.add_argument('input')
  d.add_argument('output')
  i = sub.add_parser('info', help='describe a .sps file')
  i.add_argument('input')
  m = sub.add_parser('demo', help='frame-by-frame real-time demo')
  m.add_argument('--model', required=True)
  m.add_argument('--kbps', type=float)
  m.add_argument('--levels', type=int)
  demo.add_arguments(m)
  m.add_argument('input')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  commands = {
    'encode': cmd_encode,
    'decode': cmd_decode,
    'info': cmd_info,
    'demo': cmd_demo,
  }
  try:
    return commands[args.command](args)
  except (UserError, bitstream.BitstreamError) as e:
    print(f'spectrostream: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('spectrostream: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())

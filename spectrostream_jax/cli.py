"""`spectrostream`: encode and decode audio files through the bitstream.

    spectrostream encode --model DIR song.flac song.sps --kbps 6
    spectrostream decode --model DIR song.sps song.wav
    spectrostream info song.sps
    spectrostream demo --model DIR song.flac

Files are processed block by block (`--block-seconds`) through the
streaming encoder and decoder, so memory does not grow with the length of
the input and the codes do not depend on the block size. Directories are
processed recursively. Every output is written under a temporary name and
renamed when complete. Everything that can be checked without the model
(flags, paths, formats) is checked before it loads. Ctrl-C is handled by
the console entry point (commands.py); `main` leaves KeyboardInterrupt to
its caller. Exit status: 0 ok, 1 error, 2 usage error (docs/cli.md).
"""

import argparse
from collections.abc import Callable
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np
import soundfile as sf
import soxr

from spectrostream_jax import audio_formats
from spectrostream_jax import bitstream
from spectrostream_jax import channels
from spectrostream_jax import commands
from spectrostream_jax import demo
from spectrostream_jax import files
from spectrostream_jax import precision
from spectrostream_jax import streaming
from spectrostream_jax.data import index
from spectrostream_jax.inference import Codec

PROG = 'spectrostream'
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `yes | head`.
SUFFIX = '.sps'
# Samples read from a file per call: a fixed size, so the resampler sees
# the same chunks whatever the block size.
READ_SAMPLES = 1 << 16
# What encode reads in a folder (as `spectrostream-data scan` does); decode
# writes the same extensions (audio_formats.FORMATS).
AUDIO_SUFFIXES = index.AUDIO_SUFFIXES
# Per-file failures that end that file only; anything else is a bug.
_FILE_ERRORS = (ValueError, OSError, sf.SoundFileError)

Progress = Callable[[float], None]


class UserError(Exception):
  """A mistake in the command line or its inputs: one line, exit 1."""


# Argument types: values wrong on their own are usage errors (exit 2).


def _subtype(value: str) -> str:
  subtype = value.upper()
  if subtype not in sf.available_subtypes():
    choices = ', '.join(sorted(sf.available_subtypes()))
    raise argparse.ArgumentTypeError(f'unknown {value!r} (one of {choices})')
  return subtype


# Model and its settings.


def _load_codec(model_dir: str, mode: str) -> Codec:
  try:
    return Codec.load(model_dir, mode)
  except (ValueError, OSError) as e:
    raise UserError(f'cannot load model {model_dir}: {e}') from None


def _rates(codec: Codec) -> str:
  per, n = codec.config.kbps_per_level, codec.num_levels
  return (
    f'this model codes {per:g} to {per * n:g} kbps in steps of {per:g} '
    f'(1 to {n} levels)'
  )


def _levels(codec: Codec, args) -> int:
  """The level count for --kbps or --levels, checked against the model."""
  if args.kbps is not None:
    try:
      return codec.kbps_to_levels(args.kbps)
    except ValueError:
      raise UserError(f'--kbps {args.kbps:g}: {_rates(codec)}') from None
  levels = codec.num_levels if args.levels is None else args.levels
  if not 1 <= levels <= codec.num_levels:
    raise UserError(f'--levels {levels}: {_rates(codec)}')
  return levels


def _block_frames(codec: Codec, seconds: float) -> int:
  if not seconds > 0:
    raise UserError(f'--block-seconds must be > 0, got {seconds}')
  return max(1, round(seconds * codec.config.frame_rate))


def _open_audio(path: pathlib.Path) -> sf.SoundFile:
  try:
    f = sf.SoundFile(str(path))
  except (sf.SoundFileError, OSError) as e:
    raise UserError(
      f'cannot read audio {path}: {files.first_line(e)}'
    ) from None
  return f


def _audio_format(path: pathlib.Path, subtype: str | None) -> tuple[str, str]:
  try:
    return audio_formats.output_format(path, subtype)
  except ValueError as e:
    raise UserError(str(e)) from None


# One file each way.


def encode_file(
  codec: Codec,
  src: pathlib.Path,
  dst: pathlib.Path,
  levels: int,
  block_frames: int,
  progress: Progress | None = None,
) -> bitstream.Header:
  """Streams `src` through the encoder into the bitstream file `dst`.

  `progress` is called with the seconds of audio each block coded.
  """
  cfg = codec.config
  progress = progress or (lambda seconds: None)
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

      def append(codes: np.ndarray) -> None:
        writer.append(codes)
        progress(codes.shape[0] / cfg.frame_rate)

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
        append(enc.push(x[None])[0])
      if not done:
        raise UserError(f'{src} has no audio samples')
      if resampler is not None:
        end = np.zeros((0, cfg.num_channels), np.float32)
        append(enc.push(resampler.resample_chunk(end, last=True)[None])[0])
      writer.set_original_length(done)
      # The decoder's look-ahead frames, so every input sample decodes.
      tail = np.zeros(
        (1, cfg.lookahead * cfg.samples_per_frame, cfg.num_channels),
        np.float32,
      )
      append(enc.push(tail)[0])
      append(enc.flush()[0])
    return writer.header


def decode_file(
  codec: Codec,
  src: pathlib.Path,
  dst: pathlib.Path,
  block_frames: int,
  subtype: str | None = None,
  progress: Progress | None = None,
) -> bitstream.Header:
  """Decodes `src` to audio at its original rate, channels and length.

  The format follows `dst`'s extension (WAV, FLAC, Ogg, ...); `subtype`
  defaults to float where the format has it. `progress` is called with
  the seconds of audio each block wrote.
  """
  cfg = codec.config
  dst = pathlib.Path(dst)
  fmt, subtype = _audio_format(dst, subtype)
  progress = progress or (lambda seconds: None)
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
        format=fmt,
      ) as out,
    ):
      for y, last in _decoded(reader, dec):
        if resampler is not None:
          y = resampler.resample_chunk(y, last=last)
        y = y[: h.original_length - written]
        out.write(channels.to_channels(y, out_channels))
        written += y.shape[0]
        progress(y.shape[0] / h.original_sample_rate)
      if written < h.original_length:  # Resampler rounding: pad.
        pad = np.zeros((h.original_length - written, out_channels))
        out.write(pad.astype(np.float32))
    return h


def _decoded(reader, dec):
  """(audio, is_last) per block of `reader`, then the decoder's flush."""
  for block in reader:
    yield dec.push(block[None])[0], False
  yield dec.flush()[0], True


# What to do: (input, output) pairs, checked before the model loads.


@dataclasses.dataclass
class _Plan:
  """Input -> output pairs and, in a folder, what will not be done."""

  pairs: list[tuple[pathlib.Path, pathlib.Path]]
  folder: bool = False
  ignored: list[pathlib.Path] = dataclasses.field(default_factory=list)
  # Output -> the inputs that would all be written to it.
  collisions: dict[pathlib.Path, list[pathlib.Path]] = dataclasses.field(
    default_factory=dict
  )


def _hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
  # Our own temp files (`.NAME-tmp-...`) among them.
  return any(part.startswith('.') for part in path.relative_to(root).parts)


def _plan(
  input_arg: str, output_arg: str, out_suffix: str, wanted: frozenset[str]
) -> _Plan:
  """Maps a file onto a file, or a directory onto a directory tree."""
  src, dst = pathlib.Path(input_arg), pathlib.Path(output_arg)
  if not src.exists():
    raise UserError(f'no such file or directory: {src}')
  into_dir = dst.is_dir() or output_arg.endswith(('/', os.sep))
  if not src.is_dir():
    if into_dir:
      dst = dst / (src.stem + out_suffix)
    if dst.exists() and os.path.samefile(src, dst):
      raise UserError(f'{dst} is the input file; give another output')
    return _Plan([(src, dst)])
  if dst.exists() and not dst.is_dir():
    raise UserError(f'{dst} must be a directory when the input is one')
  # An output tree inside the input tree is not input.
  skip = dst.resolve()
  plan = _Plan([], folder=True)
  by_output: dict[pathlib.Path, list[pathlib.Path]] = {}
  for p in sorted(src.rglob('*')):
    if _hidden(p, src) or not p.is_file() or skip in p.resolve().parents:
      continue
    if p.suffix.lower() not in wanted:
      plan.ignored.append(p)
      continue
    out = dst / p.relative_to(src).parent / (p.stem + out_suffix)
    by_output.setdefault(out, []).append(p)
  for out, sources in by_output.items():
    if len(sources) > 1:
      plan.collisions[out] = sources
    else:
      plan.pairs.append((sources[0], out))
  if not by_output:
    kinds = ', '.join(sorted(wanted))
    raise UserError(
      f'no input files ({kinds}) under {src}{_ignored_note(plan.ignored)}'
    )
  return plan


def _ignored_note(ignored: list[pathlib.Path]) -> str:
  if not ignored:
    return ''
  names = ', '.join(p.name for p in ignored[:3])
  more = ', ...' if len(ignored) > 3 else ''
  return f'; {_files(len(ignored))} of other kinds ignored: {names}{more}'


def _files(n: int) -> str:
  return f'{n} file' if n == 1 else f'{n} files'


# Running a plan, with progress in seconds of audio.


class _Bar:
  """A progress bar in seconds of audio, shown on a terminal only.

  A long file moves it block by block, not only when the file is done.
  """

  def __init__(self, what: str, total: float, enabled: bool):
    self._progress = None
    self._what = what
    self._done = self._file_total = self._file_done = 0.0
    if not enabled:
      return
    from rich import progress as rp  # Only where a bar is drawn.
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
      return
    self._progress = rp.Progress(
      rp.TextColumn('{task.description}'),
      rp.BarColumn(),
      rp.TextColumn('{task.completed:.1f}/{task.total:.1f} s'),
      rp.TimeElapsedColumn(),
      rp.TimeRemainingColumn(),
      console=console,
    )
    self._task = self._progress.add_task(what, total=max(total, 1e-9))

  def __enter__(self) -> '_Bar':
    if self._progress is not None:
      self._progress.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._progress is not None:
      self._progress.stop()

  def start_file(self, description: str, seconds: float) -> None:
    self._file_total, self._file_done = seconds, 0.0
    self._show(f'{self._what} {description}')

  def advance(self, seconds: float) -> None:
    """Seconds of audio done in this file; capped at its length."""
    self._file_done = min(self._file_total, self._file_done + seconds)
    self._show()

  def end_file(self) -> None:
    self._done += self._file_total
    self._file_total = self._file_done = 0.0
    self._show()

  def _show(self, description: str | None = None) -> None:
    if self._progress is None:
      return
    fields = {} if description is None else {'description': description}
    self._progress.update(
      self._task, completed=self._done + self._file_done, **fields
    )
    self._progress.refresh()


def _say(args, message: str) -> None:
  if not args.quiet:
    print(message, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class _Job:
  """How a command runs one file, and the words for what it does."""

  work: Callable[[pathlib.Path, pathlib.Path, Progress], object]
  seconds: Callable[[pathlib.Path], float]  # Of audio in an input file.
  what: str  # 'encode 6 kbps'
  verb: str  # 'encoded'
  kind: str  # 'audio': what a folder's other files are not


def _run(plan: _Plan, job: _Job, args) -> int:
  """Runs the plan; the exit status (1 if any file failed)."""
  if plan.folder and not args.overwrite:
    todo = [(s, d) for s, d in plan.pairs if not d.exists()]
    skipped = [(s, d) for s, d in plan.pairs if d.exists()]
  else:
    todo, skipped = plan.pairs, []
  failed = 0
  for out, sources in plan.collisions.items():
    both = 'both' if len(sources) == 2 else 'all'
    names = ' and '.join(str(p) for p in sources)
    print(
      f'collision: {names} {both} map to {out}; none is {job.verb} '
      '(rename one)',
      file=sys.stderr,
    )
    failed += len(sources)
  if args.verbose:
    for p in plan.ignored:
      _say(args, f'ignored {p}: not {job.kind}')
    for src, dst in skipped:
      _say(args, f'skipped {src}: {dst} exists')
  lengths = {src: job.seconds(src) for src, _ in todo}
  done = 0
  with _Bar(job.what, sum(lengths.values()), not args.quiet) as bar:
    for k, (src, dst) in enumerate(todo):
      count = f' ({k + 1}/{len(todo)})' if plan.folder else ''
      bar.start_file(f'{src.name}{count}', lengths[src])
      start = time.perf_counter()
      try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        job.work(src, dst, bar.advance)
      except (UserError, *_FILE_ERRORS) as e:
        if not plan.folder:
          raise UserError(_message(src, e)) from None
        print(f'failed {src}: {_message(src, e)}', file=sys.stderr)
        failed += 1
      else:
        done += 1
        if args.verbose:
          took = time.perf_counter() - start
          _say(
            args,
            f'{job.verb} {src} -> {dst}: {lengths[src]:.1f} s of audio in '
            f'{took:.1f} s',
          )
      bar.end_file()
  if plan.folder:
    parts = [f'{done} {job.verb}']
    if skipped:
      parts.append(f'{len(skipped)} skipped (output exists; --overwrite)')
    if failed:
      parts.append(f'{failed} failed')
    if plan.ignored:
      parts.append(f'{len(plan.ignored)} ignored (not {job.kind})')
    _say(args, f'{job.what}: {", ".join(parts)}')
  return 1 if failed else 0


def _message(src: pathlib.Path, e: Exception) -> str:
  message = files.first_line(e)
  return message if str(src) in message else f'{src}: {message}'


def _audio_seconds(path: pathlib.Path) -> float:
  try:
    info = sf.info(str(path))
  except (sf.SoundFileError, OSError, RuntimeError):
    return 0.0  # The encode says what is wrong with it.
  return info.frames / info.samplerate if info.samplerate else 0.0


def _sps_seconds(path: pathlib.Path) -> float:
  try:
    h = bitstream.read_header(path)
  except (bitstream.BitstreamError, OSError):
    return 0.0  # The decode says what is wrong with it.
  return h.original_length / h.original_sample_rate


# Commands.


def _check_output(plan: _Plan, args) -> None:
  """A single output that cannot be written is refused before loading."""
  if plan.folder:
    return
  ((_, dst),) = plan.pairs
  if dst.is_dir():
    raise UserError(f'{dst} is a directory')
  if dst.exists() and not args.overwrite:
    raise UserError(f'{dst} exists (use --overwrite to replace it)')


def cmd_encode(args) -> int:
  plan = _plan(args.input, args.output, SUFFIX, AUDIO_SUFFIXES)
  if not plan.folder:
    ((_, dst),) = plan.pairs
    if dst.suffix.lower() in AUDIO_SUFFIXES:
      raise UserError(
        f'{dst}: encode writes a {SUFFIX} bitstream, not {dst.suffix} audio'
      )
  _check_output(plan, args)
  codec = _load_codec(args.model, args.precision)
  levels = _levels(codec, args)
  frames = _block_frames(codec, args.block_seconds)
  _loaded(args, codec)
  job = _Job(
    work=lambda s, d, p: encode_file(codec, s, d, levels, frames, progress=p),
    seconds=_audio_seconds,
    what=f'encode {codec.levels_to_kbps(levels):g} kbps',
    verb='encoded',
    kind='audio',
  )
  return _run(plan, job, args)


def cmd_decode(args) -> int:
  plan = _plan(args.input, args.output, '.wav', frozenset({SUFFIX}))
  for dst in [plan.pairs[0][1]] if plan.pairs else []:
    _audio_format(dst, args.subtype)  # A folder's outputs are all WAVs.
  _check_output(plan, args)
  codec = _load_codec(args.model, args.precision)
  frames = _block_frames(codec, args.block_seconds)
  _loaded(args, codec)
  job = _Job(
    work=lambda s, d, p: decode_file(codec, s, d, frames, args.subtype, p),
    seconds=_sps_seconds,
    what='decode',
    verb='decoded',
    kind=SUFFIX,
  )
  return _run(plan, job, args)


def _loaded(args, codec: Codec) -> None:
  if args.verbose:
    _say(
      args,
      f'model {args.model}: {codec.model_id[:12]}, {codec.num_levels} '
      f'levels of {codec.config.kbps_per_level:g} kbps',
    )


def cmd_info(args) -> int:
  try:
    header = bitstream.read_header(args.input)
  except (bitstream.BitstreamError, OSError) as e:
    raise UserError(f'{args.input}: {files.first_line(e)}') from None
  print(json.dumps(bitstream.describe(header), indent=2))
  return 0


def cmd_demo(args) -> int:
  out_format = ('WAV', 'FLOAT')
  if args.out:
    out = pathlib.Path(args.out)
    out_format = _audio_format(out, None)
    if out.exists() and out.resolve() == pathlib.Path(args.input).resolve():
      raise UserError(f'{out} is the input file; give another --out')
  codec = _load_codec(args.model, args.precision)
  levels = _levels(codec, args)
  with _open_audio(pathlib.Path(args.input)) as f:
    n = min(f.frames, round(args.seconds * f.samplerate))
    x = f.read(n, dtype='float32', always_2d=True)
    rate = f.samplerate
  return demo.run(codec, levels, x, rate, args, out_format)


def _parser() -> argparse.ArgumentParser:
  p = commands.Parser(
    prog=PROG,
    description='SpectroStream neural audio codec. Exit status: 0 ok, '
    '1 error (or any file of a folder failed), 2 bad command line, '
    '130 interrupted.',
  )
  commands.add_version(p, PROG)
  sub = p.add_subparsers(dest='command', required=True)

  def bitrate(q):
    group = q.add_mutually_exclusive_group()
    group.add_argument(
      '--kbps',
      type=commands.positive_number,
      metavar='K',
      help="bitrate: a whole number of the model's levels (0.25 kbps each "
      'for the production model, 0.25 to 16)',
    )
    group.add_argument(
      '--levels',
      type=commands.whole_count,
      metavar='N',
      help='RVQ levels (default: all)',
    )

  def products(q):
    q.add_argument(
      '--precision',
      choices=precision.MODES,
      default=precision.DEFAULT,
      help="products in full float32, so codes agree with a CPU's and "
      "Google's (default), or the faster 'tensorfloat32' / 'bfloat16' on "
      'GPUs and TPUs (docs/precision.md)',
    )

  def common(q, kind):
    commands.add_version(q, PROG)
    products(q)
    commands.add_verbosity(
      q,
      quiet='no progress bar or summary; errors only',
      verbose=f'one line per {kind} (and per skipped or ignored file)',
    )
    q.add_argument(
      '--model', required=True, metavar='DIR', help='model directory'
    )
    q.add_argument(
      '--block-seconds',
      type=commands.positive_number,
      metavar='S',
      default=10.0,
      help='seconds of audio per compute step (default 10; memory, not '
      'codes, depends on it)',
    )
    q.add_argument(
      '--overwrite',
      action='store_true',
      help='replace existing outputs (a folder skips them otherwise)',
    )

  e = sub.add_parser('encode', help='audio file(s) -> .sps bitstream(s)')
  common(e, 'file encoded')
  bitrate(e)
  e.add_argument('input', type=commands.file_name, help='audio file or folder')
  e.add_argument('output', type=commands.file_name, help='.sps file or folder')
  d = sub.add_parser('decode', help='.sps bitstream(s) -> audio file(s)')
  common(d, 'file decoded')
  d.add_argument(
    '--subtype',
    type=_subtype,
    help='sample format (default FLOAT, or PCM_24 for FLAC)',
  )
  d.add_argument('input', type=commands.file_name, help='.sps file or folder')
  d.add_argument(
    'output',
    type=commands.file_name,
    help='audio file (.wav, .flac, .ogg, .aiff, ...) or folder (WAVs)',
  )
  i = sub.add_parser('info', help='describe a .sps file')
  commands.add_version(i, PROG)
  i.add_argument('input', type=commands.file_name)
  m = sub.add_parser('demo', help='frame-by-frame real-time demo')
  commands.add_version(m, PROG)
  m.add_argument(
    '--model', required=True, metavar='DIR', help='model directory'
  )
  bitrate(m)
  products(m)
  demo.add_arguments(m)
  m.add_argument('input', type=commands.file_name)
  return p


def main(argv=None) -> int:
  """Runs the command line; KeyboardInterrupt is left to the caller.

  The console script (console.spectrostream) turns Ctrl-C into exit 130
  before JAX starts; library callers and tests get Python's exception.
  """
  args = _parser().parse_args(argv)
  run = {
    'encode': cmd_encode,
    'decode': cmd_decode,
    'info': cmd_info,
    'demo': cmd_demo,
  }
  try:
    return run[args.command](args)
  except (UserError, bitstream.BitstreamError) as e:
    print(f'{PROG}: error: {files.first_line(e)}', file=sys.stderr)
    return 1
  except BrokenPipeError:
    # The reader went away (`spectrostream info x.sps | head -2`): not an
    # error to print. Python would report it again when it flushes stdout
    # at exit, so stdout goes to /dev/null first.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return BROKEN_PIPE


if __name__ == '__main__':
  # `python -m spectrostream_jax.cli`: numpy has started its BLAS threads
  # by now, too late to block SIGINT in all of them, so start again the
  # way the console script does (commands.py) for the same Ctrl-C. (Until
  # here Ctrl-C is Python's KeyboardInterrupt.)
  code = 'from spectrostream_jax import console; console.spectrostream()'
  os.execv(sys.executable, [sys.executable, '-c', code, *sys.argv[1:]])

"""What every command line of the package shares: --version and Ctrl-C.

Ctrl-C must end a command at once, whatever it is doing (importing JAX,
compiling, waiting on XLA), with one line, exit status 130 and no temp
file left behind. A KeyboardInterrupt cannot promise that: Python only
raises it between bytecodes of the main thread, so it waits for a compile
to finish, can be swallowed by a callback, and unwinding it while XLA's
threads still run has crashed the interpreter at exit. Instead SIGINT is
blocked in every thread (threads inherit the mask, so this must run
before JAX is imported) and one thread waits for it, removes the
unfinished temp files and ends the process.
"""

import argparse
from collections.abc import Callable, Iterator, Sequence
import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
from typing import NoReturn

import spectrostream_jax
from spectrostream_jax import compile_cache
from spectrostream_jax import files

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C.
_TRACKER_WARNINGS = 'ignore::UserWarning:multiprocessing.resource_tracker'


def version(prog: str) -> str:
  return f'{prog} (spectrostream_jax {spectrostream_jax.__version__})'


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
  parser.add_argument('--version', action='version', version=version(prog))


def add_verbosity(parser: argparse.ArgumentParser, quiet: str, verbose: str):
  """-q and -v, each saying what it changes for this command."""
  group = parser.add_mutually_exclusive_group()
  group.add_argument('-q', '--quiet', action='store_true', help=quiet)
  group.add_argument('-v', '--verbose', action='store_true', help=verbose)


# Argument types shared by the argparse commands: a bad value is a
# one-line usage error before anything loads.


def positive_number(value: str) -> float:
  try:
    x = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f'not a number: {value!r}') from None
  if not (x > 0 and math.isfinite(x)):
    raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
  return x


def whole_count(value: str) -> int:
  try:
    n = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f'not a whole number: {value!r}') from None
  if n < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
  return n


def file_name(value: str) -> str:
  if value == '-':
    raise argparse.ArgumentTypeError(
      'standard input and output are not supported; give a file name'
    )
  return value


class Parser(argparse.ArgumentParser):
  """Usage errors on one line; `--a_b` accepted wherever `--a-b` is known.

  The argparse commands spell their flags with dashes; the underscore
  spellings they had before stay working, unlisted, so that scripts and
  old notes do not break. Every command (and subcommand) takes
  `--compile-cache DIR|off`, applied as soon as it is parsed, before
  anything compiles (`compile_cache`).
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # SUPPRESS: a subcommand's default must not undo the command's value.
    self.add_argument(
      '--compile-cache',
      metavar='DIR',
      default=argparse.SUPPRESS,
      help=compile_cache.HELP,
    )

  def error(self, message: str) -> NoReturn:
    self.exit(2, f'{self.prog}: error: {message}\n')

  def parse_known_args(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    namespace, rest = super().parse_known_args(self._dashed(args), namespace)
    if 'compile_cache' in vars(namespace):
      compile_cache.enable(namespace.compile_cache)
    return namespace, rest

  def _dashed(self, args: Sequence[str]) -> list[str]:
    known = set(self._option_string_actions)
    out = []
    for i, arg in enumerate(args):
      if arg == '--':
        return out + list(args[i:])
      name, sep, value = arg.partition('=')
      dashed = name.replace('_', '-')
      if name.startswith('--') and name not in known and dashed in known:
        arg = dashed + sep + value
      out.append(arg)
    return out


def _end(prog: str, message: str) -> NoReturn:
  # Spawned workers inherit the blocked SIGINT, so they are ended here.
  for child in multiprocessing.active_children():
    child.kill()
  files.remove_pending(ending=True)
  with contextlib.suppress(OSError, ValueError):
    sys.stdout.flush()
  with contextlib.suppress(OSError, ValueError):
    sys.stderr.flush()
  os.write(2, f'{prog}: {message}\n'.encode())
  os._exit(INTERRUPTED)


# What the first SIGINT calls instead of ending the process (see `deferred`).
_lock = threading.Lock()
_stop: Callable[[], None] | None = None


@contextlib.contextmanager
def deferred(stop: Callable[[], None]) -> Iterator[None]:
  """Within, the first Ctrl-C calls `stop` instead of ending the process.

  For work that can end cleanly soon (a training step, then a checkpoint
  save): `stop` asks it to, and the caller ends with `finish_interrupted`.
  A second Ctrl-C still ends the process at once. Without
  `exit_on_interrupt` (library use, tests) this does nothing.
  """
  global _stop
  with _lock:
    _stop = stop
  try:
    yield
  finally:
    with _lock:
      _stop = None


def finish_interrupted(prog: str, message: str = 'interrupted') -> NoReturn:
  """Ends a process whose deferred Ctrl-C was honoured: one line, 130.

  The work stopped cleanly, so the interpreter exits as usual: worker
  processes, their queues and semaphores are released as on any exit
  (`os._exit` would leave them to multiprocessing's resource tracker,
  which complains on stderr).
  """
  files.remove_pending()
  with contextlib.suppress(OSError, ValueError):
    sys.stdout.flush()
  print(f'{prog}: {message}', file=sys.stderr, flush=True)
  sys.exit(INTERRUPTED)


def exit_on_interrupt(prog: str) -> None:
  """From now on SIGINT removes pending temp files and exits 130 at once.

  Call first thing in a console entry point, before JAX is imported; not
  from library code or tests, which keep Python's KeyboardInterrupt.
  """
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  # Worker processes ended by an interrupt can leave semaphores registered;
  # multiprocessing's resource tracker removes them when the command has
  # ended and would then print a warning after the command's last line.
  # The tracker takes its warning filters from these options.
  sys.warnoptions.append(_TRACKER_WARNINGS)

  def wait() -> None:
    signal.sigwait({signal.SIGINT})
    with _lock:
      stop = _stop
    if stop is not None:
      stop()
      signal.sigwait({signal.SIGINT})
    _end(prog, 'interrupted')

  threading.Thread(target=wait, name='sigint', daemon=True).start()

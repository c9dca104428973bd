"""Atomic writes: whole output or none, umask modes, no temp left behind."""

import os
import stat
import threading

import pytest

from spectrostream_jax import files


@pytest.fixture
def umask():
  old = os.umask(0o027)
  yield 0o027
  os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
  'error,expected',
  [
    (ValueError('\n  first\nsecond\n'), 'first'),
    (ValueError(''), 'ValueError'),
    (OSError(), 'OSError'),
    (RuntimeError('   \n '), 'RuntimeError'),
  ],
)
def test_first_line(error, expected):
  assert files.first_line(error) == expected


@pytest.mark.parametrize('durable', [False, True])
def test_write_atomic_content_and_mode(tmp_path, umask, durable):
  path = tmp_path / 'new' / 'a.txt'
  files.write_atomic(path, 'é\n', durable=durable)
  assert path.read_bytes() == 'é\n'.encode()
  assert _mode(path) == 0o640
  files.write_atomic(path, b'\x00\x01')
  assert path.read_bytes() == b'\x00\x01'
  assert os.listdir(path.parent) == ['a.txt']


def test_write_atomic_failure_keeps_target(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('old')
  with pytest.raises(TypeError):
    files.write_atomic(path, 42)
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['a.txt']


def test_atomic_path_keeps_suffix_and_replaces(tmp_path, umask):
  path = tmp_path / 'clip.wav'
  path.write_text('old')
  with files.atomic_path(path, durable=True) as tmp:
    assert tmp.parent == tmp_path
    assert tmp.name.startswith('.') and tmp.suffix == '.wav'
    os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    tmp.write_text('new')
    assert path.read_text() == 'old'  # Not before the body ends.
  assert path.read_text() == 'new'
  assert _mode(path) == 0o640
  assert os.listdir(tmp_path) == ['clip.wav']


def test_atomic_path_failure_removes_temp(tmp_path):
  path = tmp_path / 'plot.png'
  path.write_text('old')
  with pytest.raises(KeyboardInterrupt), files.atomic_path(path) as tmp:
    tmp.write_text('half')
    raise KeyboardInterrupt
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['plot.png']


def test_atomic_path_needs_a_file(tmp_path):
  with (
    pytest.raises(FileNotFoundError, match='nothing was written'),
    files.atomic_path(tmp_path / 'a.txt'),
  ):
    pass
  assert os.listdir(tmp_path) == []


def test_temp_names_differ(tmp_path):
  names = {files.temp_name(tmp_path / 'a.sps') for _ in range(20)}
  assert len(names) == 20


@pytest.mark.parametrize(
  'name,extension', [('a.wav', '.wav'), ('a.tar.gz', '.gz'), ('plot', '')]
)
def test_temp_name_extension(tmp_path, name, extension):
  tmp = files.temp_name(tmp_path / name)
  assert tmp.parent == tmp_path and tmp.name.startswith(f'.{name}-tmp-')
  assert os.path.splitext(tmp)[1] == tmp.suffix == extension


def test_atomic_dir_new(tmp_path, umask):
  out = tmp_path / 'corpus'
  with files.atomic_dir(out, overwrite=False) as tmp:
    assert tmp.name.startswith('.') and _mode(tmp) == 0o750
    (tmp / 'sub').mkdir(mode=0o700)
    fd = os.open(tmp / 'sub' / 'x', os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    assert not out.exists()
  assert _mode(out) == 0o750
  assert _mode(out / 'sub') == 0o750
  assert _mode(out / 'sub' / 'x') == 0o640
  assert os.listdir(tmp_path) == ['corpus']


def test_atomic_dir_refuses_without_overwrite(tmp_path):
  out = tmp_path / 'corpus'
  out.mkdir()
  (out / 'keep').write_text('old')
  with (
    pytest.raises(FileExistsError, match='not empty'),
    files.atomic_dir(out, overwrite=False) as tmp,
  ):
    (tmp / 'new').write_text('new')
  assert os.listdir(out) == ['keep']
  assert os.listdir(tmp_path) == ['corpus']


def test_atomic_dir_takes_an_empty_directory(tmp_path):
  out = tmp_path / 'corpus'
  out.mkdir()
  with files.atomic_dir(out, overwrite=False) as tmp:
    (tmp / 'new').write_text('new')
  assert os.listdir(out) == ['new']


def test_atomic_dir_refuses_a_file(tmp_path):
  out = tmp_path / 'corpus'
  out.write_text('a file')
  with (
    pytest.raises(FileExistsError, match='not a directory'),
    files.atomic_dir(out, overwrite=True),
  ):
    pass
  assert out.read_text() == 'a file'
  assert os.listdir(tmp_path) == ['corpus']


def test_atomic_dir_overwrite(tmp_path):
  out = tmp_path / 'corpus'
  out.mkdir()
  (out / 'old').write_text('old')
  with files.atomic_dir(out, overwrite=True) as tmp:
    (tmp / 'new').write_text('new')
    assert os.listdir(out) == ['old']  # Untouched while building.
  assert os.listdir(out) == ['new']
  assert os.listdir(tmp_path) == ['corpus']


def test_atomic_dir_failure_keeps_old(tmp_path):
  out = tmp_path / 'corpus'
  out.mkdir()
  (out / 'old').write_text('old')
  with pytest.raises(ValueError), files.atomic_dir(out, overwrite=True) as tmp:
    (tmp / 'new').write_text('new')
    raise ValueError
  assert os.listdir(out) == ['old']
  assert os.listdir(tmp_path) == ['corpus']


def test_an_ending_sweeps_a_temp_created_just_after(tmp_path, monkeypatch):
  """Ctrl-C's thread sweeps while the main thread may still create temps."""
  monkeypatch.setattr(files, '_ending', threading.Event())
  tmp = files.temp_name(tmp_path / 'out.bin')
  sweeper = threading.Thread(
    target=files.remove_pending, kwargs={'ending': True}
  )
  sweeper.start()
  tmp.write_bytes(b'partial')  # Named before the end, created around it.
  sweeper.join()
  assert not tmp.exists()
  assert not list(tmp_path.iterdir())
  named = []
  asker = threading.Thread(
    target=lambda: named.append(files.temp_name(tmp_path / 'b')),
    daemon=True,
  )
  asker.start()
  asker.join(0.2)
  assert asker.is_alive() and not named  # Held until the process ends.

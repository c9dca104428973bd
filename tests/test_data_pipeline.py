"""Corpus index, bad files, the grain pipeline, ArrayRecord and the CLI.

Every corpus is generated in a temporary directory; crops are 0.2 s so
the whole file runs in well under a minute on two cores.
"""

import contextlib
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax.data import arrayrecord
from spectrostream_jax.data import cli
from spectrostream_jax.data import index as index_lib
from spectrostream_jax.data import loudness
from spectrostream_jax.data import pipeline
from spectrostream_jax.data import sources
from spectrostream_jax.data import synthetic
from spectrostream_jax.data import transforms

SR = 48_000
AUDIO = transforms.AudioConfig(crop_samples=9600)
REASONS = transforms.RUNTIME_REASONS

# Odd but valid: every one of these must be used.
GOOD = (
  'clipped.wav',
  'low 8k mono.wav',
  'cd_44k.flac',
  'hi res 96k 24bit.wav',
  'six channel.wav',
  'nested/deeper/ünïcødé ñame.ogg',
  'nested/opus track.opus',
  'nested/song.mp3',
  'mostly silent.flac',
)
# Broken: skipped at index time, for this reason.
BAD = {
  'bad/corrupt.flac': 'corrupt',
  'bad/truncated.wav': 'truncated',
  'bad/empty.wav': 'empty_file',
  'bad/one sample.wav': 'too_short',
  'bad/silent.wav': 'silent',
  'bad/nan.wav': 'non_finite',
  'bad/inf.wav': 'non_finite',
  'bad/text.flac': 'unreadable',
  'bad/broken link.wav': 'broken_symlink',
}


def _music(seed, seconds, rate=SR):
  rng = np.random.default_rng(seed)
  return synthetic.render(rng, int(seconds * rate), rate)


def write_corpus(root: pathlib.Path) -> pathlib.Path:
  """The good and bad files above (plus a text file that is not audio)."""
  for name in ('nested/deeper', 'bad'):
    (root / name).mkdir(parents=True, exist_ok=True)
  clipped = np.clip(_music(0, 1.0) * 4, -1, 1)
  sf.write(root / 'clipped.wav', clipped, SR, subtype='PCM_16')
  sf.write(root / 'low 8k mono.wav', _music(1, 1.0, 8000)[:, 0], 8000)
  sf.write(root / 'cd_44k.flac', _music(2, 1.0, 44_100), 44_100)
  sf.write(
    root / 'hi res 96k 24bit.wav', _music(3, 1.0, 96_000), 96_000, 'PCM_24'
  )
  six = np.concatenate([_music(4, 1.0), _music(5, 1.0), _music(6, 1.0)], 1)
  sf.write(root / 'six channel.wav', six, SR)
  sf.write(root / 'nested/deeper/ünïcødé ñame.ogg', _music(7, 1.0), SR)
  sf.write(
    root / 'nested/opus track.opus', _music(8, 1.0), SR, 'OPUS', format='OGG'
  )
  sf.write(root / 'nested/song.mp3', _music(9, 1.0, 44_100), 44_100)
  quiet = np.zeros((3 * SR, 2), np.float32)
  quiet[: SR // 5] = _music(10, 0.2)
  sf.write(root / 'mostly silent.flac', quiet, SR)

  music = _music(11, 1.0)
  sf.write(root / 'bad/corrupt.flac', music, SR)
  data = bytearray((root / 'bad/corrupt.flac').read_bytes())
  for i in range(len(data) // 3, len(data), 101):
    data[i] ^= 0xFF
  (root / 'bad/corrupt.flac').write_bytes(bytes(data))
  sf.write(root / 'bad/truncated.wav', music, SR, subtype='PCM_16')
  whole = (root / 'bad/truncated.wav').read_bytes()
  (root / 'bad/truncated.wav').write_bytes(whole[: len(whole) // 2])
  (root / 'bad/empty.wav').write_bytes(b'')
  sf.write(root / 'bad/one sample.wav', music[100:101], SR)
  sf.write(root / 'bad/silent.wav', np.zeros_like(music), SR)
  for name, value in (('nan', np.nan), ('inf', np.inf)):
    broken = music.copy()
    broken[500, 1] = value
    sf.write(root / f'bad/{name}.wav', broken, SR, subtype='FLOAT')
  (root / 'bad/text.flac').write_text('this is not audio\n' * 40)
  os.symlink(root / 'bad/gone.wav', root / 'bad/broken link.wav')
  (root / 'notes.txt').write_text('ignored: not an audio file name')
  return root


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('index_cache'))


def _config(corpus, cache, **kwargs):
  source = sources.FileSource(str(corpus), cache_dir=cache)
  defaults = dict(sources=(source,), audio=AUDIO, batch_size=8, seed=0)
  return pipeline.PipelineConfig(**(defaults | kwargs))


def _take(ds_or_it, n):
  it = iter(ds_or_it)
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)], it


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['audio'], y['audio'])
    np.testing.assert_array_equal(x['skips'], y['skips'])


def _names(paths):
  return {str(pathlib.Path(p)) for p in paths}


def test_scan_reports_every_bad_file(corpus, cache):
  index = index_lib.select(
    index_lib.scan(str(corpus), cache), min_frames=AUDIO.source_frames
  )
  assert _names(f.path for f in index.files) == _names(corpus / g for g in GOOD)
  reasons = {os.path.relpath(s.path, corpus): s.reason for s in index.skipped}
  assert reasons == BAD
  summary = index.summary()
  assert summary['usable_files'] == len(GOOD)
  assert summary['skipped_by_reason'] == {
    'broken_symlink': 1,
    'corrupt': 1,
    'empty_file': 1,
    'non_finite': 2,
    'silent': 1,
    'too_short': 1,
    'truncated': 1,
    'unreadable': 1,
  }
  assert summary['sample_rates'] == {
    '8000': 1,
    '44100': 2,
    '48000': 5,
    '96000': 1,
  }
  assert summary['channels'] == {'1': 1, '2': 7, '6': 1}
  assert summary['total_seconds'] == pytest.approx(11.0, abs=0.01)
  # A minimum rate excludes low-rate files, with their own reason.
  high = index_lib.select(
    index_lib.scan(str(corpus), cache),
    min_frames=AUDIO.source_frames,
    min_sample_rate=16_000,
  )
  assert len(high.files) == len(GOOD) - 1
  assert high.summary()['skipped_by_reason']['low_sample_rate'] == 1


def test_scan_uses_its_cache(tmp_path, monkeypatch):
  root = tmp_path / 'c'
  root.mkdir()
  for i in range(3):
    sf.write(root / f'{i}.flac', _music(i, 0.5), SR)
  first = index_lib.scan(str(root), str(tmp_path / 'cache'))
  calls = []
  real_probe = index_lib.probe
  monkeypatch.setattr(
    index_lib, 'probe', lambda p: calls.append(p) or real_probe(p)
  )
  assert index_lib.scan(str(root), str(tmp_path / 'cache')) == first
  assert calls == []
  sf.write(root / '1.flac', _music(5, 0.7), SR)
  again = index_lib.scan(str(root), str(tmp_path / 'cache'))
  assert calls == [str(root / '1.flac')]
  assert again.files[1].frames == int(0.7 * SR)


def test_every_odd_file_gives_a_clean_crop(corpus, cache):
  reader, index = sources.open_files(
    sources.FileSource(str(corpus), cache_dir=cache), AUDIO
  )
  rng = np.random.default_rng(0)
  for i, f in enumerate(index.files):
    if 'silent' in f.path:
      continue
    chunk = reader.read(int(reader.offsets[i]), rng)
    crop = transforms.finish(chunk, AUDIO, rng)
    assert crop.shape == (9600, 2) and np.all(np.isfinite(crop)), f.path
    level = loudness.measure(crop, SR).integrated
    assert -26.01 <= level <= -13.99, f.path


def test_clear_errors_for_missing_or_unusable_corpus(tmp_path, corpus, cache):
  def make(path):
    return pipeline.make_dataset(_config(path, cache))

  with pytest.raises(index_lib.DataError, match='no such file or directory'):
    make(tmp_path / 'missing')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(index_lib.DataError, match='no audio files found'):
    make(tmp_path / 'empty')
  with pytest.raises(index_lib.DataError, match='no usable audio'):
    make(corpus / 'bad')
  with pytest.raises(index_lib.DataError, match='positive multiple'):
    pipeline.make_dataset(_config(corpus, cache), 0, 3)


def test_bad_corpus_yields_only_clean_batches(tmp_path):
  root = write_corpus(tmp_path / 'corpus')
  sf.write(root / 'deleted later.wav', _music(12, 3.0), SR)
  config = _config(root, str(tmp_path / 'cache'), batch_size=16)
  ds = pipeline.make_dataset(config)
  (root / 'deleted later.wav').unlink()
  batches, _ = _take(ds, 5)
  totals = dict.fromkeys(REASONS, 0)
  for batch in batches:
    audio = batch['audio']
    assert audio.shape == (16, 9600, 2) and audio.dtype == np.float32
    assert np.all(np.isfinite(audio))
    assert np.max(np.abs(audio)) <= AUDIO.max_peak + 1e-6
    for crop in audio:
      level = loudness.measure(crop, SR)
      assert -26.01 <= level.integrated <= -13.99
      assert level.ungated > AUDIO.silence_lufs
    for reason, count in pipeline.skip_counts(batch).items():
      totals[reason] += count
  # The deleted file and the silent stretch were drawn, and replaced.
  assert totals['missing'] > 0 and totals['silent_crop'] > 0
  assert totals['unreadable'] == totals['non_finite'] == 0


def test_same_seed_same_batches(corpus, cache):
  config = _config(
    corpus,
    cache,
    sources=(
      sources.FileSource(str(corpus), weight=2, cache_dir=cache),
      sources.SyntheticSource(),
    ),
  )
  a, _ = _take(pipeline.make_dataset(config), 3)
  b, _ = _take(pipeline.make_dataset(config), 3)
  _assert_same(a, b)
  other = pipeline.PipelineConfig(**{**config.__dict__, 'seed': 1})
  c, _ = _take(pipeline.make_dataset(other), 1)
  assert not np.array_equal(a[0]['audio'], c[0]['audio'])


def test_process_slices_are_disjoint_and_cover_the_global_batch(corpus, cache):
  config = _config(corpus, cache)
  whole, _ = _take(pipeline.make_dataset(config, 0, 1), 2)
  parts = [_take(pipeline.make_dataset(config, p, 2), 2)[0] for p in (0, 1)]
  for step in range(2):
    first, second = parts[0][step]['audio'], parts[1][step]['audio']
    assert first.shape == (4, 9600, 2)
    np.testing.assert_array_equal(first, whole[step]['audio'][0::2])
    np.testing.assert_array_equal(second, whole[step]['audio'][1::2])
    assert not any(np.array_equal(x, y) for x in first for y in second)


def test_resume_from_saved_state_is_exact(corpus, cache):
  config = _config(corpus, cache)
  run, it = _take(pipeline.make_dataset(config), 2)
  state = json.loads(json.dumps(it.get_state()))
  rest, _ = _take(it, 3)
  resumed = iter(pipeline.make_dataset(config))
  resumed.set_state(state)
  again, _ = _take(resumed, 3)
  _assert_same(rest, again)


def test_two_workers_give_the_same_batches_and_resume(corpus, cache):
  config = _config(corpus, cache, num_workers=2)
  serial, _ = _take(pipeline.make_dataset(_config(corpus, cache)), 5)
  it = iter(pipeline.make_dataset(config))
  try:
    first, _ = _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    rest, _ = _take(it, 3)
  finally:
    it.close()
  _assert_same(first + rest, serial)
  resumed = iter(pipeline.make_dataset(config))
  try:
    resumed.set_state(state)
    again, _ = _take(resumed, 3)
  finally:
    resumed.close()
  _assert_same(again, serial[2:])


def test_sources_are_mixed_by_weight(tmp_path):
  cache = str(tmp_path / 'cache')
  for name, freq in (('low', 300.0), ('high', 3000.0)):
    (tmp_path / name).mkdir()
    t = np.arange(SR) / SR
    for i in range(3):
      tone = 0.3 * np.sin(2 * np.pi * freq * (1 + 0.01 * i) * t)
      sf.write(tmp_path / name / f'{i}.wav', np.stack([tone] * 2, 1), SR)
  config = pipeline.PipelineConfig(
    sources=(
      sources.FileSource(str(tmp_path / 'low'), weight=3, cache_dir=cache),
      sources.FileSource(str(tmp_path / 'high'), weight=1, cache_dir=cache),
    ),
    audio=AUDIO,
    batch_size=16,
  )
  (batch,), _ = _take(pipeline.make_dataset(config), 1)
  spectra = np.abs(np.fft.rfft(batch['audio'][:, :, 0], axis=1))
  peaks = np.fft.rfftfreq(9600, 1 / SR)[np.argmax(spectra, axis=1)]
  assert np.sum(peaks < 1000) == 12 and np.sum(peaks > 1000) == 4


def test_global_batch_is_sharded_on_the_data_axis(corpus, cache):
  devices = np.array(jax.devices()).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ('data', 'model'))
  (batch,), _ = _take(pipeline.make_dataset(_config(corpus, cache)), 1)
  arrays = pipeline.to_global_batch(batch, mesh, 'data')
  audio = arrays['audio']
  assert audio.shape == (8, 9600, 2)
  assert audio.sharding.spec == jax.sharding.PartitionSpec('data')
  np.testing.assert_array_equal(np.asarray(audio), batch['audio'])
  assert {s.data.shape for s in audio.addressable_shards} == {(2, 9600, 2)}
  assert arrays['skips'].shape == (8, len(REASONS))


def test_arrayrecord_round_trip_without_tensorflow(corpus, cache, tmp_path):
  out = tmp_path / 'tfds'
  config = arrayrecord.BuildConfig(
    name='test_audio',
    segment_seconds=0.5,
    min_segment_seconds=0.25,
    eval_fraction=0.25,
  )
  summary = arrayrecord.build(str(corpus), str(out), config, cache)
  splits = summary['splits']
  assert summary['usable_files'] == len(GOOD)
  assert splits['train']['tracks'] + splits['eval']['tracks'] == len(GOOD)
  # 10 probed tracks, 3 held out (2.5 rounded up) before the one-sample
  # file, a train track, is found too short.
  assert splits['eval']['tracks'] == 3

  import tensorflow_datasets as tfds

  tracks = {}
  for split in ('train', 'eval'):
    records = tfds.data_source('test_audio', split=split, data_dir=str(out))
    assert len(records) == splits[split]['examples']
    tracks[split] = {records[i]['track'] for i in range(len(records))}
    assert records.dataset_info.metadata['sample_rate'] == SR
  assert 'tensorflow' not in sys.modules
  assert not tracks['train'] & tracks['eval']
  # A 48 kHz 16-bit stereo file comes back sample for sample.
  records = tfds.data_source('test_audio', split='train', data_dir=str(out))
  if b'clipped.wav' not in tracks['train']:
    records = tfds.data_source('test_audio', split='eval', data_dir=str(out))
  first = next(
    r
    for r in (records[i] for i in range(len(records)))
    if r['track'] == b'clipped.wav' and r['start'] == 0
  )
  original, _ = sf.read(corpus / 'clipped.wav', dtype='int16')
  np.testing.assert_array_equal(first['audio'], original[: SR // 2])

  source = sources.TfdsSource('test_audio', str(out), split='train')
  # Readers travel to grain's worker processes by pickle.
  reader = pickle.loads(pickle.dumps(sources.open_source(source, AUDIO)))
  chunk = reader.read(0, np.random.default_rng(0))
  assert chunk.sample_rate == SR and chunk.audio.shape == (9600, 2)
  ds = pipeline.make_dataset(
    pipeline.PipelineConfig(sources=(source,), audio=AUDIO, batch_size=4)
  )
  (batch,), _ = _take(ds, 1)
  assert batch['audio'].shape == (4, 9600, 2)
  assert np.all(np.isfinite(batch['audio']))
  with pytest.raises(index_lib.DataError, match='exists'):
    arrayrecord.build(str(corpus), str(out), config, cache)
  arrayrecord.build(str(corpus), str(out), config, cache, overwrite=True)
  assert os.listdir(out / 'test_audio') == ['1.0.0']
  records = tfds.data_source('test_audio', split='eval', data_dir=str(out))
  assert len(records) == splits['eval']['examples']


def _cli(*args):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = cli.main(list(args))
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


def test_cli_scan_and_build(corpus, cache, tmp_path):
  code, out, err = _cli(
    'scan', str(corpus), '--cache-dir', cache, '--min-seconds', '0.2'
  )
  assert code == 0, err
  summary = json.loads(out)
  assert summary['usable_files'] == len(GOOD)
  assert summary['skipped_files'] == len(BAD)
  assert {s['reason'] for s in summary['skipped']} == set(BAD.values())

  code, out, err = _cli(
    'build',
    str(corpus / 'nested'),
    str(tmp_path / 'ds'),
    '--cache-dir',
    cache,
    '--segment-seconds',
    '0.5',
    '--min-segment-seconds',
    '0.5',
  )
  assert code == 0, err
  splits = json.loads(out)['splits']
  # Three 1 s tracks in 0.5 s segments; one track (at least) held out.
  assert splits['train']['examples'] + splits['eval']['examples'] == 6
  assert splits['eval']['tracks'] == 1


@pytest.mark.parametrize(
  'args',
  [
    ('scan', '/does/not/exist'),
    ('build', '/does/not/exist', '/tmp/x'),
    ('scan',),
    ('frobnicate',),
    ('build', '.', '/tmp/x', '--segment-seconds', 'long'),
  ],
)
def test_cli_mistakes_are_one_line(args):
  code, out, err = _cli(*args)
  assert code != 0 and out == ''
  assert len(err.strip().splitlines()) == 1 and 'error' in err


def test_command_line_exits_cleanly():
  done = subprocess.run(
    [sys.executable, '-m', 'spectrostream_jax.data.cli', 'scan', '/no/where'],
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 1
  assert done.stderr.strip() == (
    'spectrostream-data scan: error: /no/where: no such file or directory'
  )


def test_files_and_synthetic_need_no_tensorflow_datasets(corpus, cache):
  # TFDS (with TensorFlow behind it) is absent from some accelerator
  # images; only the TfdsSource may import it, when it opens a dataset.
  script = f"""
import sys
from spectrostream_jax.data import pipeline, sources, transforms
from spectrostream_jax.training import train
config = pipeline.PipelineConfig(
  sources=(
    sources.FileSource({str(corpus)!r}, cache_dir={cache!r}),
    sources.SyntheticSource(),
  ),
  audio=transforms.AudioConfig(crop_samples=9600),
  batch_size=4,
)
batch = next(iter(pipeline.make_dataset(config)))
print(batch['audio'].shape, 'tensorflow_datasets' in sys.modules)
"""
  done = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, check=True
  )
  assert done.stdout.split()[-1] == 'False', done.stdout
  assert '(4, 9600, 2)' in done.stdout

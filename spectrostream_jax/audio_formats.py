"""The audio file an output path asks for, from its extension.

One table for everything that writes audio (`spectrostream decode` and
`demo`, `Codec.decode_to_file`): the extensions a folder encode reads
(`data.index.AUDIO_SUFFIXES`) are the ones decode writes.
"""

import pathlib

import soundfile as sf

from spectrostream_jax import files

# Extension -> soundfile format.
FORMATS = {
  '.wav': 'WAV',
  '.w64': 'W64',
  '.aif': 'AIFF',
  '.aiff': 'AIFF',
  '.flac': 'FLAC',
  '.ogg': 'OGG',
  '.oga': 'OGG',
  '.opus': 'OGG',
  '.mp3': 'MP3',
}
# Float where the format holds it (the decoder's output may exceed ±1;
# soundfile clips it for integer subtypes), else the format's best.
DEFAULT_SUBTYPES = {
  'WAV': 'FLOAT',
  'W64': 'FLOAT',
  'AIFF': 'FLOAT',
  'FLAC': 'PCM_24',
  'OGG': 'VORBIS',
  'MP3': 'MPEG_LAYER_III',
}


def output_format(
  path: files.PathLike, subtype: str | None = None
) -> tuple[str, str]:
  """(format, subtype) to write `path` in; ValueError when there is none."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  fmt = FORMATS.get(suffix)
  available = sf.available_formats()
  if fmt is None or fmt not in available:
    known = ', '.join(s for s, f in FORMATS.items() if f in available)
    raise ValueError(
      f'{path}: cannot tell the audio format from the extension '
      f'{path.suffix or "(none)"}; use one of {known}'
    )
  if subtype is None:
    subtype = 'OPUS' if suffix == '.opus' else DEFAULT_SUBTYPES[fmt]
  if not sf.check_format(fmt, subtype):
    raise ValueError(f'{path}: {fmt} cannot hold subtype {subtype}')
  return fmt, subtype

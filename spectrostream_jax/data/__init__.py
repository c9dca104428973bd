"""Training data: corpus indexing, sources, transforms and the grain pipeline.

Start with `pipeline.make_dataset(pipeline.PipelineConfig(...))`; the
`spectrostream-data` command (cli.py) checks, converts and fetches
corpora. docs/data.md explains both.
"""

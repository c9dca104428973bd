"""Training SpectroStream: the loop, its pure steps, sharding, checkpoints.

Nothing outside this package imports it except `export`, which reads a
checkpoint through `checkpoint.restore_for_export` (docs/architecture.md,
"The package map").
"""

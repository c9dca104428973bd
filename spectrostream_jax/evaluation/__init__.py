"""How good is a model? Its bitrate ladder against Opus, on real clips.

`spectrostream-eval` (ladder.py) reads clips (clips.py), decodes them
through the model and through Opus (opus.py), scores them (metrics.py)
and writes tables and plots (report.py). docs/evaluation.md explains
the metrics and the outputs.
"""

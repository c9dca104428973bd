"""How good is a model? Its bitrate ladder against classic codecs.

`spectrostream-eval` (ladder.py) reads clips (clips.py), decodes them
through the model and through Opus, AAC and MP3 (baselines.py, in
process through PyAV; opus.py, opus-tools, when asked for), scores them
(metrics.py) and writes tables and plots (report.py).
docs/evaluation.md explains the metrics and the outputs.
"""

"""drnb: self-supervised rotation pretraining for diabetic-retinopathy grading.

The pipeline, module by module: :mod:`drnb.datasets` (registry and loaders) ->
:mod:`drnb.preprocessing` (fundus crop, mask, cache) -> :mod:`drnb.pipeline` (tf.data,
augmentation, rotations) -> :mod:`drnb.models` (encoders, heads) -> :mod:`drnb.pretext` ->
:mod:`drnb.splits` and :mod:`drnb.targets` -> :mod:`drnb.finetune` -> :mod:`drnb.metrics` ->
:mod:`drnb.results` -> :mod:`drnb.plots`; :mod:`drnb.profiles` holds every setting,
:mod:`drnb.runs` the run-folder layout, :mod:`drnb.reproduce` the headless papermill run.
"""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) drowns notebook output;
# keep warnings and errors. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

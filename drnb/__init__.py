"""drnb: self-supervised pretraining (rotation, contrastive) for diabetic-retinopathy grading.

The story, module by module: :mod:`drnb.datasets` (registry and loaders) ->
:mod:`drnb.archive` (unlabelled photographs for the pretext) -> :mod:`drnb.preprocessing`
(fundus crop, mask, cache) -> :mod:`drnb.pipeline` (tf.data, augmentation, rotations, views)
-> :mod:`drnb.models` (encoders, heads) -> :mod:`drnb.training` -> :mod:`drnb.pretexts` (one
module per task) -> :mod:`drnb.pretext` and :mod:`drnb.finetune` -> :mod:`drnb.results` ->
:mod:`drnb.reproduce` -> :mod:`drnb.cli`. Each module owns its options; :mod:`drnb.profiles` gathers them into
the settings of a run.
"""

import contextlib
import importlib.util
import os
import sys

# Set this environment variable to 1 to see TensorFlow's C++ log (start-up lines about CUDA,
# oneDNN and CPU features, then its warnings and errors); unset, drnb hides it, in its own
# process and in the notebook kernels it starts, so that progress lines stay readable.
TF_LOG_VARIABLE = "DRNB_TF_LOG"


@contextlib.contextmanager
def _stderr_discarded():
    """Send file descriptor 2 to /dev/null for the block: TensorFlow writes its start-up lines
    from C++ before it reads any log setting."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


if os.environ.get(TF_LOG_VARIABLE, "0") in ("", "0"):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if importlib.util.find_spec("tensorflow") is not None:  # an accelerator machine may run Keras without it
        try:
            with _stderr_discarded():
                import tensorflow  # noqa: F401  (imported once here, quietly; every later import reuses it)
        except Exception as error:
            raise ImportError(f"TensorFlow failed to import ({error}); set {TF_LOG_VARIABLE}=1 to see its own log") from error

__version__ = "0.1.0"

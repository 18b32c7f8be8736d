"""The self-supervised pretext tasks, one module each, registered by the method they train.

See :mod:`drnb.pretexts.base` for what a task provides; :func:`drnb.pretext.train_pretext`
trains any of them.
"""

from drnb.pretexts import contrastive, rotation
from drnb.pretexts.base import PretextTask

PRETEXT_TASKS: dict[str, PretextTask] = {task.name: task for task in (rotation.TASK, contrastive.TASK)}

__all__ = ["PRETEXT_TASKS", "PretextTask"]

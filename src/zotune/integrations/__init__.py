"""zotune inside other training frameworks.

:class:`ZOTrainer` is a ``transformers.Trainer`` that takes zeroth-order steps with any zotune
method; ``examples/lightning_zo.py`` shows PyTorch Lightning with manual optimisation. This
package imports ``transformers`` (the core of zotune does not).
"""

from zotune.integrations.trainer import ZO_STATE_DIR, TrainerFacingOptimizer, ZOTrainer

__all__ = ["ZO_STATE_DIR", "TrainerFacingOptimizer", "ZOTrainer"]

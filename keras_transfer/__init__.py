"""keras_transfer: transfer learning with Keras 3, from images to a served model.

Example:
>>> import keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
>>> kt.unfreeze(model, blocks=2)
'block_15_add'
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_transfer import (  # noqa: E402
    caching,
    checkpointing,
    data,
    datasets,
    distribute,
    evaluation,
    serving,
    weights,
)
from keras_transfer.backbones import (  # noqa: E402
    REGISTRY,
    Backbone,
    get_backbone,
    list_backbones,
    single_tensor_cuts,
    unfreeze_points,
)
from keras_transfer.builders import build_classifier, build_regressor  # noqa: E402
from keras_transfer.distribute import make_strategy  # noqa: E402
from keras_transfer.evaluation import evaluate  # noqa: E402
from keras_transfer.export import (  # noqa: E402
    VerificationError,
    export_for_serving,
    verify_export,
    write_models_config,
)
from keras_transfer.freezing import (  # noqa: E402
    find_backbone,
    freeze_backbone,
    trainable_summary,
    unfreeze,
)
from keras_transfer.layers import BackbonePreprocessing  # noqa: E402
from keras_transfer.training import fine_tune  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Backbone",
    "BackbonePreprocessing",
    "build_classifier",
    "build_regressor",
    "caching",
    "checkpointing",
    "data",
    "datasets",
    "distribute",
    "evaluate",
    "evaluation",
    "make_strategy",
    "export_for_serving",
    "serving",
    "VerificationError",
    "verify_export",
    "weights",
    "write_models_config",
    "find_backbone",
    "fine_tune",
    "freeze_backbone",
    "get_backbone",
    "list_backbones",
    "single_tensor_cuts",
    "trainable_summary",
    "unfreeze",
    "unfreeze_points",
]

"""keras_transfer: transfer learning with Keras 3, from images to a served model.

Submodules and public names load on first use (PEP 562), so `import keras_transfer` and
`keras-transfer --help` do not import TensorFlow; `kt.build_classifier` imports what it needs.

Example:
>>> import keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
>>> kt.unfreeze(model, blocks=2)
'block_15_add'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

# Public name -> module that defines it. Submodules map to themselves.
_SUBMODULES = (
    "adaptation",
    "backbones",
    "builders",
    "caching",
    "checkpointing",
    "cli",
    "data",
    "datacheck",
    "datasets",
    "discrepancy",
    "distillation",
    "distribute",
    "evaluation",
    "export",
    "features",
    "freezing",
    "fusion",
    "heads",
    "inference",
    "joint",
    "layers",
    "lr_finder",
    "optimizers",
    "phases",
    "plots",
    "ranking",
    "regularizers",
    "runs",
    "serving",
    "soups",
    "training",
    "weighting",
    "weights",
)
_LAZY: dict[str, str] = {name: f"keras_transfer.{name}" for name in _SUBMODULES}
_LAZY.update(
    {
        "REGISTRY": "keras_transfer.backbones",
        "adapt": "keras_transfer.adaptation",
        "Backbone": "keras_transfer.backbones",
        "get_backbone": "keras_transfer.backbones",
        "list_backbones": "keras_transfer.backbones",
        "single_tensor_cuts": "keras_transfer.backbones",
        "unfreeze_points": "keras_transfer.backbones",
        "build_classifier": "keras_transfer.builders",
        "build_regressor": "keras_transfer.builders",
        "build_small_cnn": "keras_transfer.builders",
        "make_strategy": "keras_transfer.distribute",
        "domain_discrepancy": "keras_transfer.discrepancy",
        "importance_weights": "keras_transfer.weighting",
        "evaluate": "keras_transfer.evaluation",
        "EvaluationReport": "keras_transfer.evaluation",
        "VerificationError": "keras_transfer.export",
        "export_for_serving": "keras_transfer.export",
        "verify_export": "keras_transfer.export",
        "write_models_config": "keras_transfer.export",
        "find_backbone": "keras_transfer.freezing",
        "find_backbones": "keras_transfer.freezing",
        "build_fusion_classifier": "keras_transfer.fusion",
        "freeze_backbone": "keras_transfer.freezing",
        "trainable_summary": "keras_transfer.freezing",
        "unfreeze": "keras_transfer.freezing",
        "BackbonePreprocessing": "keras_transfer.layers",
        "fine_tune": "keras_transfer.training",
        "distill": "keras_transfer.distillation",
        "fit_joint": "keras_transfer.joint",
        "find_learning_rate": "keras_transfer.lr_finder",
        "Phase": "keras_transfer.phases",
        "fit_phases": "keras_transfer.phases",
        "CacheOptions": "keras_transfer.phases",
        "CheckpointOptions": "keras_transfer.phases",
        "head_of": "keras_transfer.heads",
        "HeadSpec": "keras_transfer.heads",
        "logits_model": "keras_transfer.heads",
        "rank_backbones": "keras_transfer.ranking",
    }
)

__all__ = [
    "adapt",
    "adaptation",
    "CacheOptions",
    "CheckpointOptions",
    "Phase",
    "datacheck",
    "features",
    "fit_phases",
    "phases",
    "plots",
    "REGISTRY",
    "Backbone",
    "BackbonePreprocessing",
    "build_classifier",
    "build_regressor",
    "build_small_cnn",
    "caching",
    "checkpointing",
    "data",
    "datasets",
    "discrepancy",
    "distribute",
    "domain_discrepancy",
    "evaluate",
    "EvaluationReport",
    "evaluation",
    "make_strategy",
    "export_for_serving",
    "serving",
    "VerificationError",
    "verify_export",
    "weights",
    "write_models_config",
    "distill",
    "distillation",
    "fit_joint",
    "joint",
    "soups",
    "find_backbone",
    "find_backbones",
    "build_fusion_classifier",
    "fusion",
    "find_learning_rate",
    "fine_tune",
    "freeze_backbone",
    "get_backbone",
    "head_of",
    "heads",
    "HeadSpec",
    "importance_weights",
    "inference",
    "list_backbones",
    "logits_model",
    "lr_finder",
    "optimizers",
    "rank_backbones",
    "ranking",
    "regularizers",
    "runs",
    "single_tensor_cuts",
    "trainable_summary",
    "unfreeze",
    "unfreeze_points",
    "weighting",
]


def _module_exists(module_path: str) -> bool:
    try:
        return importlib.util.find_spec(module_path) is not None
    except (ImportError, ValueError):
        return False


def __getattr__(name: str) -> Any:
    module_path = _LAZY.get(name)
    if module_path is None:
        raise AttributeError(f"module 'keras_transfer' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as error:
        # Only a module of ours that does not exist (yet) is a missing attribute; a missing
        # third-party dependency inside an existing module is a real error and propagates.
        if error.name != module_path:
            raise
        raise AttributeError(
            f"module 'keras_transfer' has no attribute {name!r} ({module_path} is not available)"
        ) from None
    if module_path == f"keras_transfer.{name}":
        value = module
    else:
        try:
            value = getattr(module, name)
        except AttributeError:
            raise AttributeError(
                f"module 'keras_transfer' has no attribute {name!r} "
                f"({module_path} does not define it)"
            ) from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    available = {name for name, path in _LAZY.items() if _module_exists(path)}
    return sorted(set(globals()) | available)


# A `.keras` file holds `keras_transfer>BackbonePreprocessing`, which Keras finds only once
# keras_transfer.layers has registered it. When Keras is already loaded that import is cheap;
# otherwise a one-shot import hook registers the layers right after Keras loads, so
# `import keras_transfer; import keras; keras.models.load_model(path)` works in either order
# while `import keras_transfer` alone still imports no TensorFlow.
class _RegisterLayersAfterKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        importlib.import_module("keras_transfer.layers")


if "keras" in sys.modules:
    importlib.import_module("keras_transfer.layers")
elif not any(isinstance(f, _RegisterLayersAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterLayersAfterKeras())

if TYPE_CHECKING:  # for IDEs and type checkers; nothing here runs at import time
    from keras_transfer import (  # noqa: F401
        adaptation,
        backbones,
        builders,
        caching,
        checkpointing,
        data,
        datasets,
        distribute,
        evaluation,
        export,
        freezing,
        heads,
        layers,
        serving,
        training,
        weights,
    )
    from keras_transfer.adaptation import adapt  # noqa: F401
    from keras_transfer.backbones import (  # noqa: F401
        REGISTRY,
        Backbone,
        get_backbone,
        list_backbones,
        single_tensor_cuts,
        unfreeze_points,
    )
    from keras_transfer.builders import build_classifier, build_regressor  # noqa: F401
    from keras_transfer.distribute import make_strategy  # noqa: F401
    from keras_transfer.evaluation import evaluate  # noqa: F401
    from keras_transfer.export import (  # noqa: F401
        VerificationError,
        export_for_serving,
        verify_export,
        write_models_config,
    )
    from keras_transfer.freezing import (  # noqa: F401
        find_backbone,
        find_backbones,
        freeze_backbone,
        trainable_summary,
        unfreeze,
    )
    from keras_transfer.heads import HeadSpec, head_of, logits_model  # noqa: F401
    from keras_transfer.layers import BackbonePreprocessing  # noqa: F401
    from keras_transfer.training import fine_tune  # noqa: F401

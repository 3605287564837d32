"""Unsupervised domain adaptation: a labelled source domain, an unlabelled target domain.

Three methods, each a `keras.Model` whose per-batch maths lives in `train_step` and that wraps a
Functional classifier split at a features layer: `DANN` (a domain classifier behind a
`GradientReversal` layer, Ganin et al. 2016), `DeepCORAL` (covariance alignment, Sun & Saenko
2016) and `MMD` (multi-kernel MMD², Long et al. 2015). `kt.adapt` is the one-call recipe.
`recalibrate_batchnorm` (AdaBN, Li et al. 2016) re-estimates BatchNorm statistics on the target
after any of them, or after plain source training. The classifier is trained in place and stays
a plain model: save and export it as usual.

A saved adaptation model (`dann.save("dann.keras")`) reloads once this package is imported
(`import keras_transfer.adaptation`), which registers its classes.

Example:
>>> import numpy as np, keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
>>> history = kt.adapt(model, (np.zeros((8, 32, 32, 3)), np.arange(8) % 2),
...                    np.ones((8, 32, 32, 3)), method="dann", epochs=1, batch_size=4,
...                    domain_units=(16,), verbose=0)
>>> round(history.history["domain_accuracy"][0], 1) >= 0.0
True
"""

from keras_transfer.adaptation.base import DomainAdaptation, Split, split_classifier
from keras_transfer.adaptation.batchnorm import batchnorm_layers, recalibrate_batchnorm
from keras_transfer.adaptation.coral import DeepCORAL, coral_loss, covariance
from keras_transfer.adaptation.dann import (
    DANN,
    AnnealedLearningRate,
    GradientReversal,
    ReversalSchedule,
    annealed_learning_rate,
    reversal_scale,
)
from keras_transfer.adaptation.data import pair_domains
from keras_transfer.adaptation.mmd import MMD, mmd_loss
from keras_transfer.adaptation.recipe import METHODS, adapt

__all__ = [
    "DANN",
    "METHODS",
    "MMD",
    "AnnealedLearningRate",
    "DeepCORAL",
    "DomainAdaptation",
    "GradientReversal",
    "ReversalSchedule",
    "Split",
    "adapt",
    "annealed_learning_rate",
    "batchnorm_layers",
    "coral_loss",
    "covariance",
    "mmd_loss",
    "pair_domains",
    "recalibrate_batchnorm",
    "reversal_scale",
    "split_classifier",
]

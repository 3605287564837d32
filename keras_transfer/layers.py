"""Serializable layers that put a backbone's input handling inside the model graph."""

from __future__ import annotations

import keras
from keras.applications import imagenet_utils

# The modes `BackbonePreprocessing` knows; `kt.backbones` re-exports them. Defined here, not there:
# the import hook in `keras_transfer/__init__.py` loads this module as soon as Keras loads, which
# can be in the middle of importing `kt.backbones` itself.
PREPROCESSING_MODES = ("tf", "torch", "caffe", "none")


@keras.saving.register_keras_serializable(package="keras_transfer")
class BackbonePreprocessing(keras.layers.Layer):
    """Maps raw pixels in [0, 255] to what a backbone's ImageNet weights expect.

    A thin layer over `keras.applications.imagenet_utils.preprocess_input`, so the model carries
    its preprocessing: training, evaluation, `model.predict` and a TF Serving export all see the
    same numbers. Mode `"none"` is for backbones that rescale inside themselves (EfficientNet,
    ConvNeXt, MobileNetV3).

    Args:
        mode: `"tf"` (to [-1, 1]), `"torch"` (ImageNet mean/std), `"caffe"` (RGB to BGR, minus
            the ImageNet means) or `"none"`.
        **kwargs: Standard layer arguments (`name`, `dtype`).

    Example:
    >>> import numpy as np
    >>> layer = BackbonePreprocessing("tf")
    >>> float(layer(np.full((1, 2, 2, 3), 255.0))[0, 0, 0, 0])
    1.0
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"Unknown preprocessing `mode`. Expected one of {PREPROCESSING_MODES}. "
                f"Received: mode={mode!r}"
            )
        self.mode = mode

    def call(self, inputs):
        inputs = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "none":
            return inputs
        return imagenet_utils.preprocess_input(inputs, data_format="channels_last", mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}

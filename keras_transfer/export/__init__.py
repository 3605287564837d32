"""Exports that TF Serving loads as they are, and their verification in a clean process."""

from keras_transfer.export.saved_model import *  # noqa: F403
from keras_transfer.export.saved_model import (  # noqa: F401
    _WORKER,
    _fake_png_header,
    _header_pixels,
    _site_dirs,
)

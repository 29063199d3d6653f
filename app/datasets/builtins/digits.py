"""scikit-learn's handwritten digits (``sklearn.datasets.load_digits``): the test set of the UCI
"Optical Recognition of Handwritten Digits" data (Alpaydin and Kaynak 1998,
https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits): 1,797 8x8
grey images of the digits 0-9, each pixel a count 0-16. It ships with scikit-learn, so it is
always available; Distill splits it 80/20 with the fixed seed uploads get
(``app.datasets.npz.holdout_split``).
"""

import numpy as np

from app.datasets.arrays import DatasetArrays
from app.datasets.builtins.base import BuiltinDataset
from app.datasets.npz import holdout_split, holdout_test_size
from app.ml.signature import ImagePreprocessing

SAMPLES = 1797
CLASSES = tuple(str(digit) for digit in range(10))
MAX_PIXEL = 16.0  # each pixel counts the set cells of a 4x4 block; images are scaled to [0, 1]
PREPROCESSING = ImagePreprocessing(scale=1.0 / MAX_PIXEL, channel_order="L")


def available() -> bool:
    """Always: the data ships with scikit-learn."""
    return True


def load() -> DatasetArrays:
    """Images as float32 ``[N, 1, 8, 8]`` in [0, 1], split 80/20 with seed 0."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / MAX_PIXEL)[:, None, :, :]
    x_train, y_train, x_test, y_test = holdout_split(x, bunch.target.astype(np.int64))
    return DatasetArrays(x_train, y_train, x_test, y_test, list(CLASSES), PREPROCESSING)


DATASET = BuiltinDataset(
    ref="builtin:digits",
    description="scikit-learn's 8x8 handwritten digits (UCI), split 80/20 with seed 0.",
    input_shape=(1, 8, 8),
    classes=CLASSES,
    train_size=SAMPLES - holdout_test_size(SAMPLES),
    test_size=holdout_test_size(SAMPLES),
    preprocessing=PREPROCESSING,
    load=load,
    available=available,
    install_hint="it ships with scikit-learn",
)

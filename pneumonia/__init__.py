"""pneumonia: train, tune and serve a chest X-ray pneumonia classifier on Ray.

Importing the package selects legacy Keras (tf-keras, Keras 2) for TensorFlow. Keras 3 cannot train
under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585), and TensorFlow reads
``TF_USE_LEGACY_KERAS`` only once, when it is first imported, so this must happen before any
``import tensorflow``. Ray worker processes get the same variable through the runtime environment.
"""

import os

RAY_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
"""What every Ray process of ours needs in its environment (runtime_env) before TensorFlow loads."""

for _name, _value in RAY_ENV.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
"""Label order everywhere: index 0 is NORMAL, 1 is PNEUMONIA (the positive class)."""

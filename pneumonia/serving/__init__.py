"""Serving: the Ray Serve application that answers predictions, explanations and the review page.

- :mod:`pneumonia.serving.model`: the model core (load the artifact, decode, score, explain,
  build answers), with no HTTP in it;
- :mod:`pneumonia.serving.app`: the Serve deployment and its routes (`/predict`, `/explain`,
  `/model`, Open Inference Protocol v2), admission control and batching;
- :mod:`pneumonia.serving.page`: the review page (`GET /`) and its packaged assets;
- :mod:`pneumonia.serving.errors`: the one error shape, ``{"error": "<message>"}``.
"""

from pneumonia.serving.app import Classifier, build_app
from pneumonia.serving.errors import json_errors
from pneumonia.serving.model import ServedModel

__all__ = ["Classifier", "ServedModel", "build_app", "json_errors"]

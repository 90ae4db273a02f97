"""Serving: the Ray Serve application that answers predictions, explanations and the review page.

- :mod:`pneumonia.serving.model`: the model core (load the artifact, decode, score, explain,
  build answers), with no HTTP in it;
- :mod:`pneumonia.serving.app`: the Serve deployment and its routes (`/predict`, `/explain`,
  `/model`, Open Inference Protocol v2), admission control and batching;
- :mod:`pneumonia.serving.protocol`: the Open Inference Protocol's request and response shapes;
- :mod:`pneumonia.serving.page`: the review page (`GET /`) and its packaged assets;
- :mod:`pneumonia.serving.errors`: the one error shape, ``{"error": "<message>"}``;
- :mod:`pneumonia.serving.auth`: bearer tokens, their names, the constant-time check;
- :mod:`pneumonia.serving.audit`: the audit trail, one JSON line per prediction request, off the request path;
- :mod:`pneumonia.serving.gate`: what every request passes first (its id, its token, its audit line);
- :mod:`pneumonia.serving.local_service`: the application on a local Ray (`pneumonia serve`);
- :mod:`pneumonia.serving.client`: a standard-library client for `POST /predict`.

The names below load on first use, so that the client does not import Ray Serve and FastAPI.
"""

_EXPORTS = {"Classifier": "app", "build_app": "app", "json_errors": "errors", "ServedModel": "model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pneumonia.serving' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pneumonia.serving.{_EXPORTS[name]}"), name)

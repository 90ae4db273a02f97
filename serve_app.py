"""The Ray Serve application: `serve run serve_app:app`, or `serve deploy serve_config.yaml`.

The artifact comes from $PNEUMONIA_ARTIFACT (a version folder or a registry; default ./registry,
whose LATEST version is served). With arguments: `serve run serve_app:build_app artifact=PATH`.
"""

from pneumonia import runtime

runtime.activate()  # every process that imports the app: legacy Keras before TensorFlow loads

from pneumonia.serving import build_app  # noqa: E402

__all__ = ["app", "build_app"]  # noqa: F822 - `app` comes from the module's __getattr__


def __getattr__(name: str):
    """`app` is built on first access, so importing this module never needs an artifact."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")

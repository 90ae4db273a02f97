"""pneumonia: train, tune and serve a chest X-ray pneumonia classifier on Ray.

The package's map is docs/ARCHITECTURE.md. Entry points call :func:`pneumonia.runtime.activate`
before TensorFlow loads; importing the package itself changes nothing in the process.
"""

__version__ = "0.1.0"

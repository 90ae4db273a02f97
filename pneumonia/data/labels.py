"""The label vocabulary and which files count as images.

Standard library only: the HTTP client (:mod:`pneumonia.serving.client`) uses them too.
"""

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
"""Label order everywhere: index 0 is NORMAL, 1 is PNEUMONIA (the positive class)."""

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".webp"})
"""File name endings taken as images (datasets, folders given to `pneumonia predict` or `score`)."""

"""Artifacts: what training leaves in storage and what serving loads.

- :mod:`~pneumonia.artifacts.runs`: the run layout (names, manifests, history) of runs and sweeps;
- :mod:`~pneumonia.artifacts.export`: checkpoint -> artifact, with the threshold and the guard fitted;
- :mod:`~pneumonia.artifacts.publish`: write a new version atomically (SavedModel, hashes, metadata);
- :mod:`~pneumonia.artifacts.registry`: find, verify and load a version.
"""

"""Models: Keras networks and what is saved of them. Knows nothing of Ray.

- :mod:`~pneumonia.models.architectures`: the notebook's seed CNN and ``xraynet``;
- :mod:`~pneumonia.models.checkpoint`: a checkpoint (model + preprocessing + metrics) on disk;
- :mod:`~pneumonia.models.ensemble`: K members averaged inside one Keras model, saved as a checkpoint;
- :mod:`~pneumonia.models.explain`: Grad-CAM heatmaps;
- :mod:`~pneumonia.models.ood`: the out-of-distribution guard (what is not a pediatric chest X-ray).
"""

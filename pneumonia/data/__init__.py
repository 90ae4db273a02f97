"""Data: chest X-rays from files to model inputs. Knows nothing of Ray or of models.

- :mod:`~pneumonia.data.labels`: the label order and which files are images;
- :mod:`~pneumonia.data.records`: find labelled X-rays, patient ids, patient-grouped splits;
- :mod:`~pneumonia.data.preprocess`: ``decode_image``, the one decode + resize of training and serving;
- :mod:`~pneumonia.data.pipeline`: records -> decoded arrays -> augmented ``tf.data`` batches;
- :mod:`~pneumonia.data.shifts`: the image changes a new site brings (stress validation's inputs);
- :mod:`~pneumonia.data.summary`: what a dataset holds and what is wrong with it;
- :mod:`~pneumonia.data.synth`: a synthetic dataset in the Kermany layout, for demos and tests.
"""

"""Media and data sets shared by pretraining, fine-tuning and evaluation (one floor above ``processing``).

``sources`` (image and video sources: folders, lists, HF datasets, tar shards, the shipped media), ``clips``
(video probing and clip decoding with PyAV), ``augment`` (crops, flips, normalisation to tensors) and ``shapes``
(the generated shapes data set with known answers), ``shards`` (prepared shards: webdataset-style tars + index
files + manifest, streamed from a folder or a URL) and ``prepare`` (``arlow prepare-data``, which writes them).
Imports ``processing`` only.
"""

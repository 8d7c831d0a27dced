"""Training the layers that ground a frozen LM to images (FROMAGe / GILL recipe).

- ``data``: image-caption records from TSV/CSV + image root, caption-sidecar folders and webdataset tar shards;
- ``precompute``: frozen vision features and diffusion text-encoder outputs, computed once into safetensors shards;
- ``losses``: the published losses as small pure functions;
- ``loop``: ``train(TrainConfig)`` with accelerate (one CPU to many GPUs), checkpoints and validation.

Library code (``fromage_gill/*.py``) never imports this package.
"""

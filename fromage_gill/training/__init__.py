"""Training the layers that ground a frozen LM to images (FROMAGe / GILL recipe).

- ``data``: image-caption records from TSV/CSV + image root, caption-sidecar folders and webdataset tar shards, and
  the order they are batched in;
- ``precompute``: frozen vision features and diffusion text-encoder outputs, computed once into safetensors shards;
- ``losses``: the published losses as small pure functions;
- ``objective``: the papers' combined objective of one batch (``Objective``), built from those losses;
- ``loop``: ``train(TrainConfig)`` with accelerate (one CPU to many GPUs), in named stages;
- ``distributed``: the accelerator a run uses and gathering across processes;
- ``checkpoints``: saving and resuming a run's state;
- ``validation``: held-out losses, caption accuracy and retrieval recall;
- ``decision``: GILL's retrieve-or-generate head, trained on its own.

Library code (``fromage_gill/*.py``) never imports this package.
"""

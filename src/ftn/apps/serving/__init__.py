"""Serving FTN tasks: ``ftn predict`` (files on the command line) and ``ftn serve`` (HTTP).

- :mod:`ftn.apps.serving.predict` — image decoding, the preprocessing each adapter was trained with,
  top-k labels, building a model for a set of adapter files; shared by both commands. Needs only
  torch, torchvision and Pillow.
- :mod:`ftn.apps.serving.batcher` — the cross-task dynamic batcher (bounded wait, bounded batch),
  independent of HTTP.
- :mod:`ftn.apps.serving.registry` — the adapter folder: load, add, remove, rescan; the model runner.
- :mod:`ftn.apps.serving.app` — the FastAPI application (needs the ``serve`` extra:
  ``pip install "factorized-tensor-networks[serve]"``).

``import ftn`` never imports this package; ``import ftn.apps.serving`` does not import FastAPI either.
"""

__all__ = ["predict", "batcher", "registry", "app"]

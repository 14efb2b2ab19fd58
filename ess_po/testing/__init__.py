"""Test and demo support for ess-po: offline fixtures, not part of the stable API.

Like ``torch.testing``, this package serves ess-po's own tests, benchmarks and demo, and users
who want to try the adapters without a model hub:

* :mod:`ess_po.testing.tiny` -- a tiny Qwen2 model, a character tokenizer, a copy/reverse task,
  its reward and a short supervised warm start, all built in code (needs the ``trl`` extra).

Importing this package imports nothing beyond the standard library.
"""

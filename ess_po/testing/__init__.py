"""Test and demo support for ess-po: offline fixtures, not part of the stable API.

Like ``torch.testing``, this package serves ess-po's own tests, benchmarks and demo, and users
who want to try the adapters without a model hub:

* :mod:`ess_po.testing.tiny` -- a tiny Qwen2 model, a character tokenizer, a successor/copy task,
  its reward and a short supervised warm start, all built in code (needs the ``trl`` extra).
* :mod:`ess_po.testing.batches` -- random right-padded loss inputs with known staleness.
* :mod:`ess_po.testing.processes` -- the environment scrub for child processes and the launcher
  of multi-process gloo runs (torchrun, standalone).
* :mod:`ess_po.testing.verl_harness` -- verl's actor on CPU, for the verl tests and benchmark.
* :mod:`ess_po.testing.vllm_cpu` -- workarounds for TRL's colocated engine on vLLM's CPU build.

Importing this package imports nothing beyond the standard library.
"""

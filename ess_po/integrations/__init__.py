"""Framework adapters for the ESS objective, shipped as ``ess_po.integrations``.

Each submodule imports its framework only when it is itself imported, so ``ess_po`` and this
package stay importable with torch alone (``import verl`` loads :mod:`ess_po.integrations.verl`
through its plugin entry point):

* :mod:`ess_po.integrations.trl` -- ``ESSGRPOTrainer`` (the ``trl`` extra);
* :mod:`ess_po.integrations.verl` -- the ``ess`` / ``ess_seq`` policy losses for verl
  (the ``verl`` extra);
* :mod:`ess_po.integrations.parallel` -- which ranks one ESS is all-reduced over.

Offline fixtures for tests and demos live in :mod:`ess_po.testing`.
"""

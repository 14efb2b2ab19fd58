"""The off-policy study (``python benchmarks/offpolicy_study.py``), split by concern.

``conditions``: the off-policy regimes (FP8 / bf16 rollout engine, temperature, staleness,
epochs); ``methods``: the policy losses and the ESS regulariser-tail variants; ``train``: the
task, the rollout engines and the GRPO loop; ``report``: summaries, tables and plots;
``study``: orchestration and the command line.
"""

# tests/ is a package so that pytest (import mode "prepend") puts the repository root on the import path,
# not tests/ itself: otherwise tests/vllm, tests/trl and tests/verl would be found as namespace
# packages named vllm, trl and verl wherever the real ones are not installed. The folders below
# have no __init__.py: each puts its own folder on the import path, so test basenames are unique.

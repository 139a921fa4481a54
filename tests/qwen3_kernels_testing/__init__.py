"""Helpers the tests share. They live in a package named after the project because `tests/` is on
`sys.path` when pytest runs: a top-level helper module named like a distribution (`kernels.py`
once shadowed the `kernels` package that transformers imports) breaks every import of that
distribution."""

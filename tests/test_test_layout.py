"""`tests/` is on sys.path while pytest runs (setup.cfg: pythonpath), so a module there named like an
installed distribution's top-level module shadows it: transformers 5.25 imports `kernels`, and a
`tests/kernels.py` once broke every test that imported transformers."""

import importlib.metadata
import pathlib
import sys

TESTS = pathlib.Path(__file__).parent


def test_no_module_on_the_test_path_shadows_an_installed_or_standard_module():
    ours = {p.stem for p in TESTS.glob("*.py") if p.stem != "conftest"}
    ours |= {p.name for p in TESTS.iterdir() if (p / "__init__.py").exists()}
    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert not ours & taken, f"tests/ modules shadow installed or standard modules: {sorted(ours & taken)}"

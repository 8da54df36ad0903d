"""Makes notebooks/conftest.py a distinct module (notebooks.conftest), not a second "conftest"."""

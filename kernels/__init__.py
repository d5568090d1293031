"""Pallas kernels for grouped log-prob scoring, installed as `medjax.kernels`.

The source lives in the top-level `kernels/` folder and `setup.py` maps it onto the
`medjax.kernels` package (`package_dir`), so nothing installs a top-level `kernels` module.
"""

"""Denoisers behind one interface: GeCA (`geca.py`), the DiT and UNet baselines, their blocks and named configs.

`config.py` holds the per-family configs and the named models (no torch import); `build.py` builds them.
"""

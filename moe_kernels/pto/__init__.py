"""pypto 0.2.0 stage kernels (spec §2), run in SIM mode on CPU or on an Ascend NPU.

Importing this package does nothing: pypto is imported, configured and its CPU
interpreter built only on the first kernel call (see `runtime.py`, the one module that
touches pypto internals).
"""

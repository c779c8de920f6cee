"""Analysis helpers the notebooks call: routing metrics, synthetic skew, an EPLB-style
what-if, a communication model, figure saving and the figures manifest.

Every module here is pure (tensors and frozen dataclasses in, tensors and frozen
dataclasses out) except `plots` (draws) and `manifest` (writes files when asked).
Nothing runs at import time.
"""

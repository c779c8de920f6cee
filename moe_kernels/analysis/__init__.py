"""Analysis helpers the notebooks call: routing metrics, synthetic skew, an EPLB-style
what-if, a communication model, figure saving and the figures manifest.

Every module here is pure (tensors and frozen dataclasses in, tensors and frozen
dataclasses out) except `plots`, `ep_plots` and `latency_plots` (draw), `manifest`
(writes files when asked) and `step_sweeps`, whose sweeps run the EP step model (SIM
kernels, cached on disk) when called.
Nothing runs at import time.
"""

"""Where a number comes from: provenance labels every figure and table carries."""
from __future__ import annotations

from ..pto.runtime import SUPPORTED_PYPTO_VERSION

#: Provenance of every cost-model number (figure footers and legends).
SIM_SOURCE = f"SIM cost model (Ascend 910B, pypto {SUPPORTED_PYPTO_VERSION})"
#: Provenance of the communication numbers (an alpha-beta model, not a measurement).
MODEL_SOURCE = "modelled communication"

"""The EP step model: per-rank SIM stage times that follow the routing, plus the
communication model, assembled into a per-rank step timeline (python -m moe_kernels step)."""

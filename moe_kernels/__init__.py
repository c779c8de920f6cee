"""DeepSeek-V4 MoE decode layer with expert parallelism: stage kernels (pypto), their torch
references, and the EP program. See README.md and shared spec ep-moe-spec.md."""

__version__ = "0.1.0"

"""`python -m moe_kernels ...`: see moe_kernels.cli."""
from .cli import main

raise SystemExit(main())

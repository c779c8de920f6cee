"""`python -m moe_kernels ...`: see moe_kernels.cli."""
import sys

try:  # a Ctrl-C while the CLI still imports torch also ends with one line
    from .cli import main
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())

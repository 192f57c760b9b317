"""tiflow: the pipeline stages (each runnable as ``python -m stages.<name>``) and their shared package."""
import os

# Intel MKL picks its matrix-multiply code path by memory alignment unless told otherwise, so two
# runs with the same seed on the same machine differed in the last bits from the second step on.
# "AUTO" keeps the fastest path this CPU has and makes it run-to-run reproducible (same CPU, same
# thread count). MKL reads this at its first call, so setting it here, before any stage computes,
# is enough. A user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

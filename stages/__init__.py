"""tiflow: the pipeline stages (each runnable as ``python -m stages.<name>``) and their shared package."""

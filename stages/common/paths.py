"""Names that point at things rather than files: builtin models and the demo dataset. Import-light."""
BUILTIN_PREFIX = "builtin:"  # model.path: builtin:<name>
DEMO_DATASET = "builtin:demo"  # dataset.images

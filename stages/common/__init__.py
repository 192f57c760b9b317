"""Code shared by the tiflow stages: config, files, model families, models, tokens, embeddings."""
import os

# Offline always: a stray model-hub call must fail at once instead of hanging without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# transformers warns at import about optional torchvision image processors tiflow never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

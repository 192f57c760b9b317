"""Embedding files: the in-memory embedding and its checks (core), reading any format (read), the AUTOMATIC1111 PNG (png), safetensors headers (safetensors_file)."""

"""Code shared by the tiflow stages: config, files, model families, models, tokens, embeddings."""

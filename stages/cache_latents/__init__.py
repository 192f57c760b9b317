"""cache_latents: encode every preprocessed image with the model's VAE once, keyed by content."""

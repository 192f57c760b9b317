"""train: learn a Textual Inversion embedding from cached latents and captions."""

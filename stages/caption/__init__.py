"""caption: one caption per preprocessed image, from sidecars, file names or a WD14-style tagger; and `tiflow prompts`."""

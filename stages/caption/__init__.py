"""caption: one caption per preprocessed image, from sidecars, file names or nothing."""

"""preprocess: turn a folder of user images into normalised, framed training images."""

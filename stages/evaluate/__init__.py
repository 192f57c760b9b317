"""evaluate: sample grids and loss curves for each trained embedding."""

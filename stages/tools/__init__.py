"""What only the `tiflow` console script uses: export-model, inspect, convert and prompts."""

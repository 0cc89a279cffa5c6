"""Models that plug into the engine: species, parameters and local reactions."""

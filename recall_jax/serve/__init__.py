"""Using a trained embedder: search an image folder, export a portable embedder."""

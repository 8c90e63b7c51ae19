"""Using a trained embedder: `gallery` (embed an image folder once, cached), `search` (top k of a
folder for query images, JSON and a PNG grid) and `export` (a portable embedder via jax.export).

The modules are not re-exported here: `recall_jax.serve.search` stays the module.

Serves both tasks.
"""

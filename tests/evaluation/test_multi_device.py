"""Extraction, knn and metrics on 4 forced host devices equal the single-device NumPy references."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import chex
    chex.set_n_cpu_devices(4)  # before JAX starts its backend
    import jax
    import jax.numpy as jnp
    import numpy as np
    from recall_jax.evaluation import extract_embeddings, knn, retrieval_metrics, data_mesh

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (27, 3, 3, 1), dtype=np.uint8)
    w = rng.standard_normal((9, 6)).astype(np.float32)
    seen = []

    jitted = jax.jit(lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ jnp.asarray(w))

    def embed(x):
      seen.append(x.sharding)
      return jitted(x)

    # Batches of 6 (not a multiple of 4 devices) with a padded last batch.
    batches = [{"image": np.pad(images[s:s + 6], ((0, 6 - len(images[s:s + 6])),) + ((0, 0),) * 3),
                "label": np.arange(6, dtype=np.int32) + s, "mask": np.arange(6) < 27 - s,
                "index": np.arange(s, s + 6)} for s in range(0, 27, 6)]
    emb, labels, idx = extract_embeddings(embed, batches, progress=False)
    assert len(seen[0].device_set) == 4, seen[0]
    ref = images.reshape(27, -1).astype(np.float64) @ w
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=2e-6)
    np.testing.assert_array_equal(idx, np.arange(27))

    x = rng.integers(-4, 5, (90, 5)).astype(np.float32) / 4
    x[60:] = x[:30]
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    for block in (4, 12, 90):
      _, got = knn(x, x, 20, exclude_self=True, block=block)
      np.testing.assert_array_equal(got, order)
    labels = rng.integers(0, 9, 90)
    one = retrieval_metrics(x, labels, k_values=(1, 5), mesh=data_mesh(jax.devices()[:1]))
    four = retrieval_metrics(x, labels, k_values=(1, 5), block=16)
    assert one == four, (one, four)
    print("MULTI_DEVICE_OK")
""")


def test_four_host_devices_match_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "MULTI_DEVICE_OK" in result.stdout

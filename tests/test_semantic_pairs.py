"""Tests for SePP pair mining (jaxcontrast/eval/mining.py), the pairs file
(jaxcontrast/data/pairs.py) and the CLI (jaxcontrast/semantic_pairs.py), against brute-force NumPy.

Two fixed embeddings of a Fashion-MNIST subset:
- "quantised pixels" (pixel // 16, not normalised): every dot product is an integer below 2^24,
  so float32 similarities are exact whatever the summation order, the blockwise miner must equal
  the brute force bit for bit, and the many exact ties check the lower-id tie rule;
- L2-normalised raw pixels (the CLI's embedding): compared up to float rounding.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcontrast import semantic_pairs as sp
from jaxcontrast.errors import ConfigError
from jaxcontrast.data import pairs as pairs_lib
from jaxcontrast.eval import mining

N_SUBSET = 1800


@pytest.fixture(scope="module")
def fmnist():
  from jaxcontrast.data.fashion_mnist import load_fashion_mnist_numpy
  try:
    images, labels = load_fashion_mnist_numpy("train")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return images[:N_SUBSET], labels[:N_SUBSET]


@pytest.fixture(scope="module")
def quantised(fmnist):
  """(N, 784) float32 with values 0..15: dot products exact in float32."""
  return (fmnist[0].reshape(N_SUBSET, -1) // 16).astype(np.float32)


@pytest.fixture(scope="module")
def exact(quantised):
  """The quantised embedding's N x N dot products in int64 (read-only: copy before changing)."""
  sims = quantised.astype(np.int64) @ quantised.astype(np.int64).T   # ~3 s: computed once
  sims.flags.writeable = False
  return sims


@pytest.fixture(scope="module")
def normalised(fmnist):
  x = fmnist[0].reshape(N_SUBSET, -1).astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(sims: np.ndarray, top_k: int, threshold: float):
  """Reference: full N x N similarities, self removed, stable sort (ties -> lower id)."""
  sims = np.array(sims, dtype=np.float64)
  np.fill_diagonal(sims, -np.inf)
  order = np.argsort(-sims, axis=1, kind="stable")[:, :top_k]
  values = np.take_along_axis(sims, order, axis=1)
  keep = values > threshold
  return np.where(keep, order, -1).astype(np.int32), np.where(keep, values, -np.inf)


def brute_same_label_rate(indices, labels):
  rows, cols = np.nonzero(indices >= 0)
  return float(np.mean(labels[rows] == labels[indices[rows, cols]]))


@pytest.mark.parametrize("block_size,chunk_size,top_k,threshold", [
    (256, None, 10, 30000.0),   # 1800 = 7 * 256 + 8: ragged last block.
    (300, 170, 7, 50000.0),     # neither divides N, chunk < block.
    (97, 1024, 25, 20000.0),    # chunk > block, prime block.
    (N_SUBSET, N_SUBSET, 3, -1.0),  # one block; threshold below everything.
    (512, 700, 1, 0.0),
])
def test_matches_brute_force_exactly(quantised, exact, fmnist, block_size, chunk_size, top_k,
                                     threshold):
  want_ids, want_sims = brute_force(exact, top_k, threshold)
  got = mining.mine_semantic_pairs(quantised, threshold=threshold, top_k=top_k,
                                   block_size=block_size, chunk_size=chunk_size, normalize=False,
                                   labels=fmnist[1])
  assert got.indices.dtype == np.int32 and got.similarities.dtype == np.float32
  assert got.indices.shape == (N_SUBSET, top_k)
  np.testing.assert_array_equal(got.indices, want_ids)
  np.testing.assert_array_equal(got.similarities, want_sims.astype(np.float32))
  assert got.metadata["same_label_rate"] == brute_same_label_rate(want_ids, fmnist[1])
  pairs_lib.validate_pairs(got)


def test_threshold_is_strict(quantised, exact):
  """A neighbour whose similarity equals the threshold exactly is dropped (similarity > t)."""
  exact = exact.copy()
  np.fill_diagonal(exact, -1)
  anchor = 5
  nearest = int(np.argmax(exact[anchor]))
  threshold = float(exact[anchor, nearest])  # exactly representable in float32
  got = mining.mine_semantic_pairs(quantised, threshold=threshold, top_k=4, block_size=500,
                                   normalize=False)
  assert nearest not in got.partners(anchor)
  assert (got.similarities[got.valid] > threshold).all()
  below = mining.mine_semantic_pairs(quantised, threshold=threshold - 1, top_k=4, block_size=500,
                                     normalize=False)
  assert below.partners(anchor)[0] == nearest


def test_exact_fixture_has_ties(exact):
  """The exact comparison above exercises tie-breaking only if ties occur among the top 25."""
  exact = exact.copy()
  np.fill_diagonal(exact, -1)
  top = -np.sort(-exact, axis=1)[:, :25]
  assert (np.diff(top, axis=1) == 0).sum() > 20


@pytest.mark.parametrize("block_size,chunk_size,top_k,threshold", [
    (128, None, 10, 0.85),
    (333, 250, 20, 0.9),
    (1000, 1800, 5, 0.0),
])
def test_matches_brute_force_normalised_pixels(normalised, fmnist, block_size, chunk_size, top_k,
                                               threshold):
  labels = fmnist[1]
  want_ids, want_sims = brute_force(normalised @ normalised.T, top_k, threshold)
  # Raw (unnormalised) pixels in: the miner normalises itself.
  got = mining.mine_semantic_pairs(fmnist[0].reshape(N_SUBSET, -1), threshold=threshold,
                                   top_k=top_k, block_size=block_size, chunk_size=chunk_size,
                                   labels=labels)
  tol = 1e-5
  # Values agree everywhere up to float32 rounding (including which slots are padding, except
  # for values within tol of the threshold).
  near_threshold = np.abs(want_sims - threshold) < tol
  assert np.array_equal(got.indices >= 0, want_ids >= 0) or near_threshold.any()
  both = (got.indices >= 0) & (want_ids >= 0)
  np.testing.assert_allclose(got.similarities[both], want_sims[both], atol=tol, rtol=0)
  # Each reported similarity is the true similarity of that pair, and never self.
  rows, cols = np.nonzero(got.indices >= 0)
  partners = got.indices[rows, cols]
  assert not (partners == rows).any()
  np.testing.assert_allclose(got.similarities[rows, cols],
                             np.sum(normalised[rows] * normalised[partners], axis=1),
                             atol=tol, rtol=0)
  # Ids equal except where the brute-force order is decided by less than float32 rounding.
  with np.errstate(invalid="ignore"):  # -inf - -inf on padding: NaN, never a near tie
    gaps = np.abs(np.diff(want_sims, axis=1))
  near_tie = np.zeros_like(near_threshold)
  near_tie[:, 1:] |= gaps < tol
  near_tie[:, :-1] |= gaps < tol
  differ = got.indices != want_ids
  assert not (differ & ~near_tie & ~near_threshold).any()
  assert differ.mean() < 1e-3
  # Same-label rate equals the brute-force one (up to the near-tie swaps above).
  rate = pairs_lib.same_label_rate(got, labels)
  want_rate = brute_same_label_rate(want_ids, labels)
  print(f"\nsame-label rate (pixels, top_k={top_k}, threshold={threshold}): {rate:.4f}, "
        f"brute force {want_rate:.4f}, coverage {pairs_lib.coverage(got):.3f}")
  assert abs(rate - want_rate) <= differ.sum() / max(got.num_pairs, 1)
  assert rate == got.metadata["same_label_rate"]
  assert rate > 0.5  # chance is ~0.1 on balanced 10-class Fashion-MNIST


def test_duplicates_found_and_self_excluded_by_index(quantised):
  """Exact copies are partners at similarity 1; the image itself never is, in any block layout."""
  base = quantised[:400]
  dup_of = {400: 3, 401: 250, 402: 399, 403: 3}  # 3 has two copies; 250 and its copy across blocks
  emb = np.concatenate([base, base[list(dup_of.values())]])
  for block_size, chunk_size in [(64, 50), (404, 404), (7, 400)]:
    got = mining.mine_semantic_pairs(emb, threshold=0.999, top_k=5, block_size=block_size,
                                     chunk_size=chunk_size)
    assert not (got.indices == np.arange(len(emb))[:, None]).any()
    for copy, orig in dup_of.items():
      twins = sorted({copy, orig} | {c for c, o in dup_of.items() if o == orig})
      for member in twins:
        want = [t for t in twins if t != member]
        # As a set: copies tie at similarity 1 up to the matmul's rounding, which differs
        # between column positions of a block, so their order is not defined.
        assert sorted(got.partners(member).tolist()) == want, (block_size, member)
        np.testing.assert_allclose(got.similarities[member, :len(want)], 1.0, atol=1e-5)
    # Everything else has no partner above 0.999 in this subset.
    others = np.setdiff1d(np.arange(len(emb)), [3, 250, 399, 400, 401, 402, 403])
    assert (got.counts[others] == 0).all()


def test_threshold_above_one_gives_no_pairs(fmnist):
  emb = fmnist[0][:300].reshape(300, -1)
  got = mining.mine_semantic_pairs(emb, threshold=1.0001, top_k=5, block_size=128,
                                   labels=fmnist[1][:300])
  assert got.num_pairs == 0
  assert (got.indices == -1).all() and np.isneginf(got.similarities).all()
  assert pairs_lib.coverage(got) == 0.0
  assert np.isnan(pairs_lib.same_label_rate(got, fmnist[1][:300]))


def test_top_k_larger_than_n_pads():
  emb = np.array([[1, 0], [1, 1], [0, 1], [-1, 0]], np.float32)
  got = mining.mine_semantic_pairs(emb, threshold=-2.0, top_k=6, block_size=3, chunk_size=2)
  assert got.counts.tolist() == [3, 3, 3, 3]
  assert (got.indices[:, 3:] == -1).all() and np.isneginf(got.similarities[:, 3:]).all()
  assert got.partners(0).tolist() == [1, 2, 3]  # cos 0.707, 0, -1
  np.testing.assert_allclose(got.similarities[0, :3], [np.sqrt(0.5), 0.0, -1.0], atol=1e-6)
  single = mining.mine_semantic_pairs(emb[:1], threshold=-2.0, top_k=2)
  assert single.num_pairs == 0 and single.indices.shape == (1, 2)


def test_embed_fn_and_batches_match_embeddings(fmnist):
  """The embed_fn path (masked padded last batch, ids shuffled) equals the direct path."""
  images, labels = fmnist[0][:700], fmnist[1][:700]
  direct = mining.mine_semantic_pairs(images.reshape(700, -1), threshold=0.8, top_k=8,
                                      block_size=256, labels=labels)
  batches = list(mining.numpy_batches(images, labels, batch_size=128))  # 6 * 128 - 700 = 68 padded
  assert not batches[-1]["mask"].all()
  perm = np.random.default_rng(0).permutation(len(batches))
  shuffled = []
  for b in (batches[i] for i in perm):  # batch order scrambled; ids restore dataset order
    shuffled.append(b)
  progress = []
  mined = mining.mine_semantic_pairs(embed_fn=jax.jit(mining.pixel_embed_fn),
                                     batches=iter(shuffled), threshold=0.8, top_k=8, block_size=256,
                                     progress=progress.append, embedding="pixels")
  np.testing.assert_array_equal(mined.indices, direct.indices)
  np.testing.assert_allclose(mined.similarities, direct.similarities, atol=1e-6)
  assert mined.metadata["same_label_rate"] == direct.metadata["same_label_rate"]
  assert [p["done"] for p in progress] == [256, 512, 700]
  assert all(p["images_per_s"] > 0 for p in progress)
  with pytest.raises(ValueError, match="permutation"):
    bad = [dict(b, id=np.zeros(128, int)) for b in batches]
    mining.mine_semantic_pairs(embed_fn=mining.pixel_embed_fn, batches=bad, threshold=0.8, top_k=8)


def test_same_label_rate_and_coverage_by_hand():
  pairs = pairs_lib.SemanticPairs(
      np.array([[1, 2], [0, -1], [-1, -1], [2, -1]], np.int32),
      np.array([[0.9, 0.8], [0.9, -np.inf], [-np.inf, -np.inf], [0.7, -np.inf]], np.float32))
  labels = np.array([0, 0, 1, 1])
  # Directed pairs: 0-1 same, 0-2 diff, 1-0 same, 3-2 same.
  assert pairs_lib.same_label_rate(pairs, labels) == 0.75
  assert pairs_lib.coverage(pairs) == 0.75
  assert pairs.num_pairs == 4 and pairs.counts.tolist() == [2, 1, 0, 1]
  with pytest.raises(ValueError, match="labels"):
    pairs_lib.same_label_rate(pairs, labels[:3])


def test_save_load_round_trip_exact(tmp_path, normalised):
  got = mining.mine_semantic_pairs(normalised[:500].astype(np.float32), threshold=0.85, top_k=6,
                                   block_size=200, embedding="pixels", note="round trip")
  path = tmp_path / "pairs.npz"
  pairs_lib.save_pairs(path, got, extra=3)
  loaded = pairs_lib.load_pairs(path)
  assert isinstance(loaded, pairs_lib.SemanticPairs)
  assert loaded.indices.dtype == np.int32 and loaded.similarities.dtype == np.float32
  np.testing.assert_array_equal(loaded.indices, got.indices)
  assert loaded.similarities.tobytes() == got.similarities.tobytes()  # bitwise, -inf included
  assert loaded.metadata == json.loads(json.dumps(dict(got.metadata, extra=3)))
  for key in ("threshold", "top_k", "n", "embedding", "format_version"):
    assert key in loaded.metadata
  assert loaded.metadata["threshold"] == 0.85 and loaded.metadata["n"] == 500
  assert sorted(np.load(path).files) == ["indices", "metadata", "similarities"]


def _write(path, **arrays):
  np.savez(path, **arrays)
  return path


def _good_arrays():
  indices = np.array([[1, -1], [0, 2], [-1, -1]], np.int32)
  sims = np.array([[0.9, -np.inf], [0.9, 0.5], [-np.inf, -np.inf]], np.float32)
  meta = json.dumps({"threshold": 0.4, "top_k": 2, "n": 3, "embedding": "pixels",
                     "format_version": pairs_lib.FORMAT_VERSION})
  return dict(indices=indices, similarities=sims, metadata=np.asarray(meta))


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("similarities"), "missing keys"),
    (lambda a: a.update(indices=a["indices"].astype(np.int64)), "int32"),
    (lambda a: a.update(similarities=a["similarities"].astype(np.float64)), "float32"),
    (lambda a: a.update(similarities=a["similarities"][:, :1]), "shape"),
    (lambda a: a.update(indices=np.array([[1, -1], [0, 3], [-1, -1]], np.int32)), "range"),
    (lambda a: a.update(indices=np.array([[1, -1], [0, -2], [-1, -1]], np.int32)), "range"),
    (lambda a: a.update(indices=np.array([[0, -1], [0, 2], [-1, -1]], np.int32)), "itself"),
    (lambda a: a.update(indices=np.array([[-1, 1], [0, 2], [-1, -1]], np.int32)), "padding"),
    (lambda a: a.update(similarities=np.array([[0.9, -np.inf], [0.5, 0.9], [-np.inf, -np.inf]],
                                              np.float32)), "sorted"),
    (lambda a: a.update(similarities=np.array([[0.9, np.nan], [0.9, 0.5], [-np.inf, -np.inf]],
                                              np.float32)), "-inf"),
    (lambda a: a.update(metadata=np.asarray("{not json")), "JSON"),
    (lambda a: a.update(metadata=np.asarray('{"threshold": 0.4}')), "missing"),
    (lambda a: a.update(metadata=np.asarray(str(a["metadata"]).replace('"n": 3', '"n": 4'))),
     "n=4"),
])
def test_load_rejects_bad_files(tmp_path, change, message):
  arrays = _good_arrays()
  pairs_lib.load_pairs(_write(tmp_path / "good.npz", **arrays))  # the unmodified file loads
  change(arrays)
  path = _write(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=message):
    pairs_lib.load_pairs(path)


def test_load_rejects_non_npz_and_missing(tmp_path):
  path = tmp_path / "junk.npz"
  path.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="not a readable"):
    pairs_lib.load_pairs(path)
  with pytest.raises(FileNotFoundError):
    pairs_lib.load_pairs(tmp_path / "absent.npz")


def test_save_requires_metadata_and_valid_arrays(tmp_path):
  arrays = _good_arrays()
  pairs = pairs_lib.SemanticPairs(arrays["indices"], arrays["similarities"])
  with pytest.raises(ValueError, match="threshold"):
    pairs_lib.save_pairs(tmp_path / "p.npz", pairs, embedding="pixels")
  bad = pairs_lib.SemanticPairs(arrays["indices"], arrays["similarities"][:, ::-1].copy())
  with pytest.raises(ValueError):
    pairs_lib.save_pairs(tmp_path / "p.npz", bad, threshold=0.4, embedding="pixels")
  assert not os.path.exists(tmp_path / "p.npz")


def _hlo_shapes(text):
  """Every array shape in an HLO module's text, as tuples of ints."""
  shapes = []
  for dims in re.findall(r"\b(?:f32|s32|pred|u32|f64|s64)\[([0-9,]*)\]", text):
    shapes.append(tuple(int(d) for d in dims.split(",") if d))
  return shapes


def test_block_function_never_builds_n_by_n():
  """Lower the block kernel for N = 1,000,000 (N x N f32 would be 4 TB) and inspect its HLO.

  Apart from the (M, D) embedding input itself, no array in the optimised HLO may have more
  elements than the block's working set O(block * (chunk + k)), and the compiled temporary
  memory must be of that order too. Computing the full row against all N columns at once, or
  an N x N matrix, fails both checks.
  """
  n, dim, block, chunk, k = 1_000_000, 16, 256, 512, 10
  b, c, m = mining._block_layout(n, block, chunk)
  emb = jax.ShapeDtypeStruct((m, dim), jnp.float32)
  lowered = mining._topk_block.lower(emb, jnp.int32(0), jnp.float32(0.5), n=n, block_size=b,
                                     chunk_size=c, top_k=k, precision="highest")
  compiled = lowered.compile()
  working_set = b * (c + k)
  for text in (lowered.as_text(dialect="hlo"), compiled.as_text()):
    shapes = _hlo_shapes(text)
    assert shapes
    big = [s for s in shapes if s != (m, dim) and int(np.prod(s)) > 2 * working_set]
    assert not big, big[:5]
  mem = compiled.memory_analysis()
  if mem is not None:
    assert mem.temp_size_in_bytes < 8 * 4 * working_set, mem.temp_size_in_bytes
  out = jax.eval_shape(
      lambda e: mining._topk_block(e, jnp.int32(0), jnp.float32(0.5), n=n, block_size=b,
                                   chunk_size=c, top_k=k, precision="highest"), emb)
  assert [o.shape for o in out] == [(b, k), (b, k)]


def _mining_config(**settings):
  c = sp.default_mining_config()
  c.update(settings)
  return c


def test_mine_to_file_writes_loadable_file(tmp_path):
  """What `python -m jaxcontrast.semantic_pairs --config.KEY=VALUE ...` runs after parsing (its
  command line itself: test_cli.py)."""
  out = tmp_path / "fm_pairs.npz"
  pairs, path = sp.mine_to_file(_mining_config(embedding="pixels", threshold=0.9, top_k=5,
                                               limit=600, block_size=256, out=str(out)))
  assert path == str(out)
  loaded = pairs_lib.load_pairs(out)
  assert loaded.n == 600 and loaded.k == 5
  np.testing.assert_array_equal(loaded.indices, pairs.indices)
  assert loaded.metadata["embedding"] == "pixels" and loaded.metadata["threshold"] == 0.9
  assert 0.5 < loaded.metadata["same_label_rate"] <= 1.0


@pytest.mark.parametrize("settings,workdir,key", [
    ({"embedding": "checkpoint"}, None, "embedding"),     # needs --workdir
    ({"threshold": None}, None, "threshold"),              # required
    ({"top_k": 0}, None, "top_k"),
    ({"out": None}, None, "out"),                          # nowhere to write without --workdir
    ({"limit": 10}, "/tmp/run", "limit"),                  # a split's prefix with --workdir
])
def test_bad_settings_name_their_key(settings, workdir, key):
  c = _mining_config(**{"threshold": 0.9, "top_k": 5, "out": "x.npz", **settings})
  with pytest.raises(ConfigError, match=rf"^config {key} = "):
    sp.validate(c, workdir)

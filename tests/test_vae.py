"""Wan 2.2 VAE: golden parity, strict loading, key table, the safe .pth reader, streaming semantics."""
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lance_jax import parity
from lance_jax.convert.keys import CheckpointMismatchError
from lance_jax.convert.pth_io import UnsafePickleError, read_pth
from lance_jax.convert.safetensors_io import read_tensors, write_safetensors
from lance_jax.convert.vae_keys import vae_key_table
from lance_jax.models import vae as V
from lance_jax.models.vae_blocks import avg_down_3d, dup_up_3d


@pytest.fixture(scope="module")
def vae_dir(golden):
    return os.path.join(golden.root, "vae")


@pytest.fixture(scope="module")
def vae_cfg(vae_dir):
    return V.load_vae_config(vae_dir)


@pytest.fixture(scope="module")
def st_path(vae_dir):
    (name,) = [f for f in os.listdir(vae_dir) if f.endswith(".safetensors")]
    return os.path.join(vae_dir, name)


@pytest.fixture(scope="module")
def vae_params(st_path, vae_cfg):
    return jax.tree.map(jnp.asarray, V.load_vae_params(st_path, vae_cfg))


# ---------------------------------------------------------------------------------------------- parity


def test_vae_parity_all_rows_pass(golden, capsys):
    rows = parity.run(golden.root, ["vae"])
    assert rows and all(r.passed for r in rows), "\n".join(r.format() for r in rows if not r.passed)
    names = {r.name for r in rows}
    for item in ("video", "image"):
        for suffix in ("mu_raw", "mu", "logvar", "latent_sampled_thwc", "recon_preclamp", "recon", "recon_of_sampled"):
            assert f"{item}_{suffix}" in names
    assert {"latents_mean48", "latents_inv_std48"} <= names


def test_latent_constants_equal_golden(golden):
    z = golden.arrays("vae")
    assert V.LATENT_MEAN.shape == V.LATENT_STD.shape == (48,)
    np.testing.assert_array_equal(V.LATENT_MEAN, z["latents_mean48"])
    np.testing.assert_array_equal(V.LATENT_INV_STD, z["latents_inv_std48"])


def test_bf16_compute_is_close(golden, vae_dir):
    """dtype=bfloat16 (bf16 params too): encode and decode of the image stay near the fp32 goldens."""
    cfg = V.load_vae_config(vae_dir, dtype="bfloat16", param_dtype="bfloat16")
    params = V.load_vae_params(vae_dir, cfg)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params))
    z = golden.arrays("vae")
    enc = V.encode(params, z["image_x"], cfg)
    assert enc.mu.dtype == jnp.float32
    for name, ours in (("image_mu", enc.mu), ("image_logvar", enc.logvar)):
        g = z[name]
        assert np.abs(np.asarray(ours) - g).max() <= 5e-2 * np.abs(g).max(), name
    rec = V.decode(params, jnp.asarray(np.moveaxis(z["image_mu"], 0, -1), jnp.bfloat16), cfg)
    assert rec.dtype == jnp.float32
    assert np.abs(np.asarray(rec) - z["image_recon"]).max() <= 5e-2 * np.abs(z["image_recon"]).max()


# ------------------------------------------------------------------------------- weights and key table


def test_key_table_round_trip_is_bit_exact(st_path, vae_cfg):
    ref = dict(read_tensors(st_path))
    params = V.load_vae_params(st_path, vae_cfg)
    back = dict(V.vae_reference_tensors(params, vae_cfg))
    assert len(vae_key_table(vae_cfg)) == 196 and set(back) == set(ref)
    for key, arr in back.items():
        assert arr.dtype == ref[key].dtype and arr.shape == ref[key].shape and np.array_equal(arr, ref[key]), key


def test_key_table_covers_the_model_tree(vae_cfg):
    shapes = V.vae_param_shapes(vae_cfg)
    flat = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    assert flat == {r.path for r in vae_key_table(vae_cfg)}
    # every param carries logical axis names, one per dimension
    boxed = V.vae_abstract_params(vae_cfg)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(len(b.names) == len(b.value.shape) for b in leaves)


def test_real_model_structure():
    cfg = V.VaeConfig()  # c_dim 160, dec_dim 256: the released Wan2.2_VAE.pth (spec §A.10)
    rules = vae_key_table(cfg)
    shapes = V.vae_param_shapes(cfg)
    total = 0
    for r in rules:
        leaf = shapes
        for p in r.path:
            leaf = leaf[p]
        total += int(np.prod(r.ref_shape(leaf)))
    assert len(rules) == 196 and total == 704_688_668
    by_key = {r.ref: r for r in rules}
    leaf = shapes["decoder"]["upsamples_0"]["upsamples_3"]["time_conv"]["kernel"]
    assert by_key["decoder.upsamples.0.upsamples.3.time_conv.weight"].ref_shape(leaf) == (2048, 1024, 3, 1, 1)


def test_strict_loading_lists_every_problem(st_path, vae_cfg, tmp_path):
    tensors = dict(read_tensors(st_path))
    del tensors["encoder.middle.1.to_qkv.bias"]
    del tensors["decoder.head.0.gamma"]
    tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["conv2.weight"] = np.zeros((48, 48, 1, 1), np.float32)  # lost a singleton dim
    path = str(tmp_path / "bad.safetensors")
    write_safetensors(path, tensors)
    with pytest.raises(CheckpointMismatchError) as err:
        V.load_vae_params(path, vae_cfg)
    msg = str(err.value)
    assert "2 missing" in msg and "encoder.middle.1.to_qkv.bias" in msg and "decoder.head.0.gamma" in msg
    assert "1 unexpected" in msg and "decoder.extra.weight" in msg
    assert "1 mis-shaped" in msg and "conv2.weight: checkpoint (48, 48, 1, 1), model expects (48, 48, 1, 1, 1)" in msg
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        V.load_vae_params(st_path, vae_cfg.replace(c_dim=16))  # wrong config for the file


def test_pth_reader_equals_safetensors(vae_dir, st_path, vae_cfg):
    (pth,) = [os.path.join(vae_dir, f) for f in os.listdir(vae_dir) if f.endswith(".pth")]
    a, b = read_pth(pth), dict(read_tensors(st_path))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k
    from_pth = V.load_vae_params(pth, vae_cfg)
    from_st = V.load_vae_params(st_path, vae_cfg)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_pth, from_st))


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ckpt/data.pkl", payload)
        zf.writestr("ckpt/byteorder", "little")


def test_pth_reader_refuses_arbitrary_globals(tmp_path):
    evil = tmp_path / "evil.pth"
    _zip_with_pickle(evil, pickle.dumps({"w": _Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        read_pth(str(evil))
    evil2 = tmp_path / "evil2.pth"
    _zip_with_pickle(evil2, b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        read_pth(str(evil2))
    not_zip = tmp_path / "legacy.pth"
    not_zip.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        read_pth(str(not_zip))


# ------------------------------------------------------------------------------ semantics, random weights


def _random_params(cfg, seed=0):
    """Init params with every leaf perturbed (non-zero biases, non-unit gammas)."""
    rng = np.random.default_rng(seed + 1)
    params = V.init_vae_params(cfg, seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.1 * rng.standard_normal(a.shape, np.float32)), params)


def test_streaming_equals_whole_sequence_and_is_causal():
    """§A.7.3: the streamed (scan + cache) path equals the whole-clip path for 13 frames / 4 latent
    frames; latent frame k depends only on pixel frames <= 4k, output frames <= 4k only on latents <= k."""
    cfg = V.VaeConfig(c_dim=4, dec_dim=4, num_res_blocks=1)
    params = _random_params(cfg)
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (1, 3, 13, 32, 32)).astype(np.float32)
    streamed = V.encode(params, video, cfg)
    whole = V.encode(params, video, cfg, stream=False)
    assert streamed.mu.shape == (1, 48, 4, 2, 2)
    for a, b in zip(streamed, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(np.asarray(b)).max())
    later = video.copy()
    later[:, :, 5:] = rng.uniform(-1, 1, later[:, :, 5:].shape)
    changed = V.encode(params, later, cfg)
    np.testing.assert_array_equal(np.asarray(changed.mu)[:, :, :2], np.asarray(streamed.mu)[:, :, :2])
    assert not np.allclose(np.asarray(changed.mu)[:, :, 2:], np.asarray(streamed.mu)[:, :, 2:])

    latent = rng.normal(size=(1, 4, 2, 2, 48)).astype(np.float32)
    dec = V.decode(params, latent, cfg, clamp=False)
    dec_whole = V.decode(params, latent, cfg, clamp=False, stream=False)
    assert dec.shape == (1, 3, 13, 32, 32)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(dec_whole), rtol=0,
                               atol=1e-5 * np.abs(np.asarray(dec_whole)).max())
    latent2 = latent.copy()
    latent2[:, 2:] += 1.0
    dec2 = V.decode(params, latent2, cfg, clamp=False)
    np.testing.assert_array_equal(np.asarray(dec2)[:, :, :5], np.asarray(dec)[:, :, :5])
    clamped = V.decode(params, latent, cfg)
    np.testing.assert_array_equal(np.asarray(clamped), np.clip(np.asarray(dec), -1, 1))


def test_unsupported_shapes_raise_clear_errors(vae_params, vae_cfg):
    good = np.zeros((3, 5, 64, 64), np.float32)
    for bad, match in (
        (np.zeros((3, 4, 64, 64), np.float32), "1 \\+ 4k frames"),
        (np.zeros((3, 6, 64, 64), np.float32), "1 \\+ 4k frames"),
        (np.zeros((3, 5, 40, 64), np.float32), "multiple of 16"),
        (np.zeros((3, 5, 64, 72), np.float32), "multiple of 16"),
        (np.zeros((4, 5, 64, 64), np.float32), "3 colour channels"),
        (np.zeros((1, 5, 64, 64, 3), np.float32), "3 colour channels"),
        (good[0], "must be \\(B, 3, T, H, W\\)"),
    ):
        with pytest.raises(ValueError, match=match):
            V.encode(vae_params, bad, vae_cfg)
    with pytest.raises(ValueError, match="channel-last"):
        V.decode(vae_params, np.zeros((2, 4, 4, 47), np.float32), vae_cfg)
    with pytest.raises(ValueError, match="channel-last"):
        V.decode(vae_params, np.zeros((48, 2, 4, 4), np.float32), vae_cfg)  # channel-first by mistake


def test_sample_latent_layout_and_key():
    rng = np.random.default_rng(1)
    mu, logvar, eps = (rng.normal(size=(2, 48, 3, 2, 5)).astype(np.float32) for _ in range(3))
    out = V.sample_latent(mu, logvar, eps)
    assert out.shape == (2, 3, 2, 5, 48)
    np.testing.assert_allclose(np.asarray(out), np.moveaxis(mu + np.exp(0.5 * logvar) * eps, 1, -1), rtol=1e-5,
                               atol=1e-6)
    a = V.sample_latent(mu[0], logvar[0], key=jax.random.PRNGKey(3))
    b = V.sample_latent(mu[0], logvar[0], key=jax.random.PRNGKey(3))
    assert a.shape == (3, 2, 5, 48) and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="eps or a PRNG key"):
        V.sample_latent(mu, logvar)


def test_patchify_order_and_round_trip():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 3, 2, 4, 6)).astype(np.float32)
    y = np.asarray(V.patchify(jnp.asarray(x), 2))
    assert y.shape == (1, 2, 2, 3, 12)
    for c, q, r, i, j in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (2, 0, 1, 1, 1), (2, 1, 1, 0, 2)]:
        assert y[0, 1, i, j, c * 4 + r * 2 + q] == x[0, c, 1, 2 * i + q, 2 * j + r]
    np.testing.assert_array_equal(np.asarray(V.unpatchify(jnp.asarray(y), 2)), x)


def test_avg_down_and_dup_up_index_maps():
    rng = np.random.default_rng(3)
    cin, cout, ft, fs = 3, 6, 2, 2
    x = rng.normal(size=(1, 3, 4, 4, cin)).astype(np.float32)  # 3 frames: one zero frame is prepended
    out = np.asarray(avg_down_3d(jnp.asarray(x), cout, ft, fs))
    xp = np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)
    f, g = ft * fs * fs, cin * ft * fs * fs // cout
    want = np.zeros((1, 2, 2, 2, cout), np.float32)
    for o in range(cout):
        for tau in range(2):
            for i in range(2):
                for j in range(2):
                    vals = []
                    for k in range(o * g, (o + 1) * g):
                        c, rem = divmod(k, f)
                        a, rem = divmod(rem, fs * fs)
                        b, d = divmod(rem, fs)
                        vals.append(xp[0, tau * ft + a, i * fs + b, j * fs + d, c])
                    want[0, tau, i, j, o] = np.mean(vals)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)

    cin, cout, ft, fs = 4, 2, 1, 2  # the depth-to-space decoder shortcut (R = 2)
    x = rng.normal(size=(1, 2, 2, 3, cin)).astype(np.float32)
    out = np.asarray(dup_up_3d(jnp.asarray(x), cout, ft, fs, first_chunk=False))
    f, rep = ft * fs * fs, cout * ft * fs * fs // cin
    for o in range(cout):
        for i in range(4):
            for j in range(6):
                b, d = i % fs, j % fs
                assert out[0, 1, i, j, o] == x[0, 1, i // fs, j // fs, (o * f + b * fs + d) // rep]
    y = np.asarray(dup_up_3d(jnp.asarray(x), 4, 2, 2, first_chunk=True))  # t*ft - (ft-1) frames on chunk 0
    assert y.shape == (1, 3, 4, 6, 4)


def test_params_shard_with_the_logical_rules(vae_cfg):
    from lance_jax import sharding
    from lance_jax.models.vae_blocks import VAE_LOGICAL_RULES

    known = {name for name, _ in sharding.LOGICAL_RULES}
    rules = sharding.LOGICAL_RULES + tuple(r for r in VAE_LOGICAL_RULES if r[0] not in known)
    mesh = sharding.make_mesh({"fsdp": -1})
    shardings = sharding.param_shardings(V.vae_abstract_params(vae_cfg), mesh, rules)
    assert len(jax.tree.leaves(shardings)) == 196

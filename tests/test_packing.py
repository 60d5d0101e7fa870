"""Host-side stream plans: layout, padding, stacking and the errors bad input gets."""
import numpy as np
import pytest

from lance_jax import packing
from lance_jax.layers.masking import MODE_NOISE


def _plan(n_text=6, n_lat=4, caps=None):
    """text (causal) | latent block (noise) | 1 text; CE on the first two text tokens."""
    n = n_text + n_lat + 1
    vae = np.arange(n_text, n_text + n_lat)
    return packing.plan_stream_batch(
        token_ids=np.arange(100, 100 + n), position_ids=np.tile(np.arange(n), (3, 1)),
        sample_lens=[n], split_lens=[n_text, n_lat, 1], attn_modes=["causal", "noise", "causal"],
        vit_token_indexes=np.array([1]), vae_token_indexes=vae,
        latents=np.ones((n_lat, 4), np.float32), latent_pos_ids=np.arange(n_lat), timestep_logits=np.zeros(n_lat),
        ce_indexes=np.array([0, 1]), ce_labels=np.array([101, 102]), capacities=caps, bucket=8,
    )


def test_layout_und_rows_then_gen_rows():
    plan = _plan()
    cu, cg, kce, _ = packing.stream_capacities(plan)
    assert (cu, cg, kce) == (8, 8, 8)
    np.testing.assert_array_equal(plan["und_index"], [0, 1, 2, 3, 4, 5, 10, -1])
    np.testing.assert_array_equal(plan["gen_index"], [6, 7, 8, 9, -1, -1, -1, -1])
    np.testing.assert_array_equal(plan["order"][cu:cu + 4], [6, 7, 8, 9])
    assert (plan["mode"][cu:cu + 4] == MODE_NOISE).all()
    assert (plan["sample"][:cu][plan["und_index"] < 0] == -1).all() and plan["sample"][-1] == -1
    np.testing.assert_array_equal(plan["und_vit_slot"][:3], [-1, 0, -1])
    np.testing.assert_array_equal(plan["ce_rows"][:2], [0, 1])
    assert plan["ce_valid"].sum() == 2 and np.isneginf(plan["timestep_logits"][4:]).all()


def test_stack_pads_to_largest_and_natural_order_roundtrips():
    a, b = _plan(), _plan(n_text=12, n_lat=9)
    batch = packing.stack_stream_batches([a, b])
    caps = packing.stream_capacities(batch)
    assert caps.und == 16 and caps.gen == 16
    values = np.arange(caps.und + caps.gen)
    back = packing.natural_order(values[: caps.und], values[caps.und:], batch["und_index"][1], batch["gen_index"][1], 22)
    assert sorted(batch["order"][1][back]) == list(range(22))


def test_loss_weights_are_optional_rows_padded_with_zero():
    plain = _plan()
    assert "gen_loss_weight" not in plain and "ce_loss_weight" not in plain
    n_lat = 4
    kw = dict(token_ids=np.arange(100, 111), position_ids=np.tile(np.arange(11), (3, 1)), sample_lens=[11],
              split_lens=[6, 4, 1], attn_modes=["causal", "noise", "causal"], vit_token_indexes=np.array([1]),
              vae_token_indexes=np.arange(6, 10), latents=np.ones((n_lat, 4), np.float32),
              latent_pos_ids=np.arange(n_lat), timestep_logits=np.zeros(n_lat), ce_indexes=np.array([0, 1]),
              ce_labels=np.array([101, 102]), bucket=8)
    plan = packing.plan_stream_batch(**kw, gen_loss_weight=np.full(n_lat, 0.5), ce_loss_weight=np.array([2.0, 3.0]))
    np.testing.assert_array_equal(plan["gen_loss_weight"], [0.5] * 4 + [0.0] * 4)
    np.testing.assert_array_equal(plan["ce_loss_weight"], [2.0, 3.0] + [0.0] * 6)
    grown = packing.pad_stream_batch(plan, packing.Capacities(16, 16, 12, 8))
    np.testing.assert_array_equal(grown["gen_loss_weight"][4:], 0.0)
    assert grown["gen_loss_weight"].shape == (16,) and grown["ce_loss_weight"].shape == (12,)
    with pytest.raises(ValueError, match="gen_loss_weight has shape"):
        packing.plan_stream_batch(**kw, gen_loss_weight=np.ones(3))
    with pytest.raises(ValueError, match="different keys"):
        packing.stack_stream_batches([plan, plain])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="do not fit capacity"):
        _plan(caps=packing.Capacities(4, 8, 8, 8))
    with pytest.raises(ValueError, match="ViT tokens and CE positions must be und"):
        packing.plan_stream_batch(
            token_ids=np.arange(4), position_ids=np.zeros((3, 4), int), sample_lens=[4], split_lens=[4],
            attn_modes=["causal"], vit_token_indexes=np.array([2]), vae_token_indexes=np.array([2]),
            latents=np.zeros((1, 4)), latent_pos_ids=np.zeros(1), timestep_logits=np.zeros(1),
            ce_indexes=np.array([], int), ce_labels=np.array([], int))
    with pytest.raises(ValueError, match="cannot shrink"):
        packing.pad_stream_batch(_plan(), packing.Capacities(4, 8, 8, 0))


def test_latent_tokens_and_positions():
    lat = np.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3).astype(np.float32)
    toks = packing.latent_tokens(lat)
    np.testing.assert_array_equal(toks[7], lat[0, 1, 1])  # raster order t, h, w
    big = packing.latent_tokens(lat, (1, 2, 2))
    assert big.shape == (2 * 2 * 3, 12)
    np.testing.assert_array_equal(big[0].reshape(2, 2, 3), lat[0, :2, :2])
    with pytest.raises(ValueError, match="not divisible"):
        packing.latent_tokens(lat, (1, 3, 4))
    ids = packing.latent_position_ids((2, 2, 3), max_latent_size=16, max_latent_frames=7)
    np.testing.assert_array_equal(ids[:4], [0, 1, 2, 16])
    assert ids[6] == 256
    with pytest.raises(ValueError, match="exceeds the position table"):
        packing.latent_position_ids((1, 17, 2), max_latent_size=16, max_latent_frames=7)

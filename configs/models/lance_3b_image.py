"""Lance_3B (image checkpoint): the released numbers, 10-backbone §1.

Usage: `--config configs/models/lance_3b_image.py --config.model.num_layers=2`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(
            hidden_size=2048,
            num_layers=36,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=11008,
            vocab_size=151936,
            vocab_size_eff=151665,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            mrope_section=[16, 24, 24],
            dual_stream=True,
            qk_norm_und=True,
            qk_norm_gen=True,
            rope_bf16_inv_freq=True,  # the released model runs with bf16-rounded rotary frequencies
            bos_token_id=151644,
            eos_token_id=151645,
            pad_token_id=151643,
            vision_start_token_id=151652,
            vision_end_token_id=151653,
            image_token_id=151655,
            video_token_id=151656,
            spatial_merge_size=2,
            tokens_per_second=2,
            latent_channels=48,
            latent_patch_size=[1, 1, 1],
            max_latent_size=64,
            # The image checkpoint stores a 64*64-row latent position table (one latent frame).
            max_num_frames=1,
            timestep_shift=4.0,
            ce_weight=0.25,
            mse_weight=1.0,
            timestep_embed_dim=256,
            vit_out_hidden_size=2048,
            dtype="bfloat16",
            param_dtype="float32",
            attention_impl="auto",
            attention_block_size=512,
            dense_attention_max_len=4096,
            scan_layers=True,
            remat_policy="full",
        )
    )
    return c

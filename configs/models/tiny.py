"""A tiny Lance with the golden parity set's shape (hidden 64, 3 layers): unit tests and smoke runs."""
import os

from lance_jax.config import config_dict_from_file


def get_config():
    c = config_dict_from_file(os.path.join(os.path.dirname(__file__), "lance_3b_image.py"))
    c.model.update(
        dict(
            hidden_size=64,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=320,
            vocab_size_eff=310,
            mrope_section=[2, 3, 3],
            rope_bf16_inv_freq=False,
            bos_token_id=297,
            eos_token_id=298,
            pad_token_id=296,
            vision_start_token_id=305,
            vision_end_token_id=306,
            image_token_id=308,
            video_token_id=309,
            max_latent_size=16,
            max_num_frames=25,
            vit_out_hidden_size=64,
            dtype="float32",
            remat_policy="none",
        )
    )
    return c

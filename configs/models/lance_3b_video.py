"""Lance_3B_Video: same backbone as the image checkpoint, latent table for 121 frames (31 latent frames)."""
import os

from lance_jax.config import config_dict_from_file


def get_config():
    c = config_dict_from_file(os.path.join(os.path.dirname(__file__), "lance_3b_image.py"))
    c.model.max_num_frames = 121
    return c

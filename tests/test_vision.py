"""ViT preprocessing: golden patchify, the bucket size tables of the spec, frame handling, clear errors."""
import numpy as np
import pytest
from PIL import Image

from lance_jax import vision as V

# 20 §4.2: (ratio, {side: "HxW"}) for the VAE (divisor 16) and ViT (divisor 28) presets.
SIZE_TABLE = {
    "21:9": {768: "496x1152", 672: "420x1008", 640: "416x976", 616: "392x924", 480: "320x752", 476: "280x700",
             256: "160x368", 224: "140x336", 512: "336x784", 448: "280x672"},
    "16:9": {768: "576x1024", 672: "504x896", 640: "480x848", 616: "448x812", 480: "352x624", 476: "336x616",
             256: "192x336", 224: "140x280", 512: "384x688", 448: "336x588"},
    "4:3": {768: "672x896", 672: "560x756", 640: "560x752", 616: "504x700", 480: "416x560", 476: "392x560",
            256: "224x304", 224: "168x252", 512: "448x592", 448: "364x504"},
    "1:1": {768: "768x768", 672: "672x672", 640: "640x640", 616: "588x588", 480: "480x480", 476: "476x476",
            256: "256x256", 224: "224x224", 512: "512x512", 448: "448x448"},
    "3:4": {768: "896x672", 672: "756x560", 640: "752x560", 616: "700x504", 480: "560x416", 476: "560x392",
            256: "304x224", 224: "252x168", 512: "592x448", 448: "504x364"},
    "9:16": {768: "1024x576", 672: "896x504", 640: "848x480", 616: "812x448", 480: "624x352", 476: "616x336",
             256: "336x192", 224: "280x140", 512: "688x384", 448: "588x336"},
}
VIT_SIDES = (672, 616, 476, 224, 448)


@pytest.mark.parametrize("ratio", list(SIZE_TABLE))
def test_bucket_and_crop_sizes_match_spec_table(ratio):
    for side, want in SIZE_TABLE[ratio].items():
        divisor = 28 if side in VIT_SIDES else 16
        bh, bw = V.buckets(side)[ratio]
        assert "%dx%d" % V.divisible_crop_box(bh, bw, divisor)[2:] == want, (ratio, side)


def test_spec40_vit_bucket_before_crop():
    # 40 §B.2 table: "ViT bucket -> crop"
    assert V.buckets(672)["16:9"] == (512, 912) and V.buckets(616)["1:1"] == (608, 608)
    assert V.buckets(448)["4:3"] == (384, 512) and V.buckets(616)["21:9"] == (400, 928)


def test_patchify_golden_exact(golden):
    z = golden.arrays("vit")
    items = [k[: -len("_pixels")] for k in z if k.endswith("_pixels")]
    assert items
    for item in items:
        patches, grid = V.patchify(z[f"{item}_pixels"])
        np.testing.assert_array_equal(patches, z[f"{item}_patches"])
        np.testing.assert_array_equal(grid, z[f"{item}_grid_thw"])
        _, t, h, w = z[f"{item}_pixels"].shape
        assert V.vit_grid(t, h, w) == tuple(z[f"{item}_grid_thw"][0])


def test_preprocess_image_16_9():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8))
    assert V.choose_bucket(1080, 1920, 672) == (512, 912) and V.resized_size(1080, 1920, 672) == (504, 896)
    assert V.ratio_crop_box(1080, 1920, 912 / 512) == (1, 0, 1078, 1920)
    patches, grid, pixels = V.preprocess_image(image, side=672)
    assert pixels.shape == (3, 2, 504, 896) and grid.tolist() == [[1, 36, 64]]
    np.testing.assert_array_equal(pixels[:, 0], pixels[:, 1])  # image duplicated to two frames
    np.testing.assert_array_equal(patches, V.patchify(pixels)[0])
    assert patches.shape == (2304, 1176) and V.vit_token_count(1, 504, 896) == 576
    # portrait input: transposed sizes
    assert V.preprocess_image(image.transpose(Image.Transpose.ROTATE_90), side=672)[2].shape == (3, 2, 896, 504)


def test_constant_colour_normalises_exactly():
    frames = np.full((1, 300, 300, 3), (255, 0, 128), np.uint8)
    _, grid, pixels = V.preprocess_image(frames[0], side=224)
    assert grid.tolist() == [[1, 16, 16]]
    want = (np.array([255, 0, 128], np.float32) / np.float32(255) - V.CLIP_MEAN) / V.CLIP_STD
    np.testing.assert_allclose(pixels[:, :, 100, 100].T, np.broadcast_to(want, (2, 3)), atol=1e-6)


def test_video_odd_frames_padded():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 240, 320, 3), dtype=np.uint8)  # 4:3
    patches, grid, pixels = V.preprocess_video(frames, side=616)
    assert pixels.shape == (3, 6, 504, 700) and grid.tolist() == [[3, 36, 50]]
    np.testing.assert_array_equal(pixels[:, 5], pixels[:, 4])
    assert len(patches) == 3 * 36 * 50 and V.vit_token_count(5, 504, 700) == 3 * 18 * 25
    # 20 §4.6: a 6 s 16:9 clip at video_480p: 69 frames -> 70 -> 35 x 16 x 29 tokens
    assert V.vit_grid(69, 448, 812) == (35, 32, 58) and V.vit_token_count(69, 448, 812) == 16240


def test_image_modes_composite_on_white():
    rgba = Image.new("RGBA", (64, 64), (10, 20, 30, 0))  # fully transparent -> white
    assert np.asarray(V.image_to_rgb(rgba)).reshape(-1, 3).min() == 255
    pal = Image.new("P", (64, 64))
    pal.putpalette([200, 100, 50] * 256)
    assert tuple(np.asarray(V.image_to_rgb(pal))[0, 0]) == (200, 100, 50)
    assert V.image_to_rgb(Image.new("L", (32, 32), 7)).mode == "RGB"


@pytest.mark.parametrize("frames, match", [
    (np.zeros((2, 64, 64, 4), np.uint8), "3 \\(RGB\\) channels"),
    (np.zeros((0, 64, 64, 3), np.uint8), "empty video"),
    (np.zeros((2, 64, 64, 3), np.float32), "uint8"),
    (np.zeros((2, 10, 64, 3), np.uint8), "too small"),
    (np.zeros((64, 64), np.uint8), "\\(T, H, W, 3\\)"),
])
def test_video_errors(frames, match):
    with pytest.raises(ValueError, match=match):
        V.preprocess_video(frames)


def test_other_errors():
    with pytest.raises(ValueError, match="PIL image"):
        V.preprocess_image([[1, 2, 3]])
    with pytest.raises(ValueError, match="one frame"):
        V.preprocess_image(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="divisible by 28"):
        V.vit_grid(2, 100, 112)
    with pytest.raises(ValueError, match="at least one frame"):
        V.vit_grid(0, 112, 112)
    with pytest.raises(ValueError, match="multiple"):
        V.patchify(np.zeros((3, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="too small"):
        V.bucket_for_ratio(8, 16 / 9)

"""Building blocks shared by the backbone, the ViT and the heads."""

"""One 8 x H100-80GB node (NVLink). Variants:

  train (default): fsdp=8: 65,536 tokens per device, params / grads / Adam state split 8 ways.
  infer: data=2 (the two CFG rows), context=4 (the ~49k-token noise split of a 480p/121-frame video).
  train_cp: fsdp=4, context=2: longer packed sequences (131k tokens per row over 2 devices).
"""
import ml_collections

VARIANTS = {
    "train": dict(data=1, fsdp=8, context=1, tensor=1),
    "infer": dict(data=2, fsdp=1, context=4, tensor=1),
    "train_cp": dict(data=1, fsdp=4, context=2, tensor=1),
}


def get_config(variant: str = "train") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"h100x8 variant {variant!r} not in {sorted(VARIANTS)}")
    return ml_collections.ConfigDict(dict(
        name=f"h100x8:{variant}", platform="gpu", num_devices=8, device_memory_gb=80.0,
        peak_tflops_bf16=989.0,  # dense bf16, SXM
        shape=VARIANTS[variant], description="8 x H100 80GB SXM, one host"))

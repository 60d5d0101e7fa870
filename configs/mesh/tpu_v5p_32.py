"""A TPU v5p-32 slice: 16 chips (one JAX device each, 95 GB HBM), 4 hosts of 4 chips. Variants:

  train (default): fsdp=16.
  infer: data=2 (CFG rows), context=8.
"""
import ml_collections

VARIANTS = {
    "train": dict(data=1, fsdp=16, context=1, tensor=1),
    "infer": dict(data=2, fsdp=1, context=8, tensor=1),
}


def get_config(variant: str = "train") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"tpu_v5p_32 variant {variant!r} not in {sorted(VARIANTS)}")
    return ml_collections.ConfigDict(dict(
        name=f"tpu_v5p_32:{variant}", platform="tpu", num_devices=16, device_memory_gb=95.0,
        peak_tflops_bf16=459.0, shape=VARIANTS[variant], description="TPU v5p-32 slice, 4 hosts"))

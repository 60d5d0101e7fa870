"""8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): every axis exercised, 2 ways each
except data. Variants (`configs/mesh/cpu8.py:VARIANT`): data8, fsdp8, fsdp_context_tensor (default),
data_fsdp_context."""
import ml_collections

VARIANTS = {
    "fsdp_context_tensor": dict(data=1, fsdp=2, context=2, tensor=2),
    "data_fsdp_context": dict(data=2, fsdp=2, context=2, tensor=1),
    "data8": dict(data=8, fsdp=1, context=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, context=1, tensor=1),
}


def get_config(variant: str = "fsdp_context_tensor") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"cpu8 variant {variant!r} not in {sorted(VARIANTS)}")
    return ml_collections.ConfigDict(dict(
        name=f"cpu8:{variant}", platform="cpu", num_devices=8, device_memory_gb=0.0,
        peak_tflops_bf16=0.0, shape=VARIANTS[variant],
        description="8 fake CPU devices for sharding tests and AOT plans"))

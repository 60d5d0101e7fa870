"""One accelerator (or one CPU device): every axis 1, shardings are no-ops."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="gpu1", platform="gpu", num_devices=1, device_memory_gb=80.0, peak_tflops_bf16=989.0,
        shape=dict(data=1, fsdp=1, context=1, tensor=1), description="a single GPU"))

"""Generation fine-tuning (`multi_gen.yaml`, `sft_lance_generation.sh`): T2I, T2V, I2I, V2V at 1/4 each, EMA on."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.stage(["t2i", "t2v", "i2i", "v2v"], ema=True, save_every=10)

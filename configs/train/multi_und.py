"""Understanding fine-tuning (`multi_und.yaml`, `sft_lance_understand.sh`): I2T, V2T at 1/2 each, EMA on."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.stage(["i2t", "v2t"], ema=True, save_every=10)

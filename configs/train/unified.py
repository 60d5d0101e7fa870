"""Unified fine-tuning (released `unified.yaml` + `sft_lance_unified.sh`): T2I, T2V, I2I, V2V, I2T, V2T at
1/6 each per sample draw, EMA off, save every 200 (50 §4.1-4.2). `require_und_gen` is not needed with a
global loss reduction and is not implemented (see the report)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.stage(["t2i", "t2v", "i2i", "v2v", "i2t", "v2t"], ema=False, save_every=200)

"""v2v fine-tuning (released `v2v_local.yaml` + the sft script settings, 50 §4). Point the group at data:
`--config.data.groups[0].path=DIR` (our shards; `source=reference` for the reference Parquet layout)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    return _common.stage(["v2v"], ema=True, save_every=10, model="lance_3b_video")

"""Config files, the reference-folder loader and command-line overrides."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lance_jax.config import config_dict_from_file, load_reference_config, model_config_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_reference_loader_reads_every_size_from_the_folder(golden):
    cfg = golden.model_config()
    llm = json.loads(Path(golden.model_dir, "llm_config.json").read_text())
    lance = json.loads(Path(golden.model_dir, "lance_config.json").read_text())
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (
        llm["hidden_size"], llm["num_hidden_layers"], llm["num_attention_heads"], llm["num_key_value_heads"],
        llm["intermediate_size"])
    assert list(cfg.mrope_section) == llm["rope_scaling"]["mrope_section"]
    assert cfg.vocab_size == llm["vocab_size"] and cfg.video_token_id == llm["video_token_id"]
    assert cfg.max_latent_size == lance["max_latent_size"] and cfg.max_num_frames == lance["max_num_frames"]
    assert cfg.vocab_size_eff == golden.meta["len_tokenizer"]
    assert cfg.dual_stream and cfg.qk_norm_und and cfg.qk_norm_gen and not cfg.rope_bf16_inv_freq


def test_bf16_rotary_default_follows_the_checkpoint_dtype(golden, tmp_path):
    assert not golden.model_config().rope_bf16_inv_freq  # fp32 goldens
    llm = json.loads(Path(golden.model_dir, "llm_config.json").read_text())
    (tmp_path / "llm_config.json").write_text(json.dumps({**llm, "torch_dtype": "bfloat16"}))
    assert load_reference_config(str(tmp_path)).rope_bf16_inv_freq  # the released json declares bf16
    assert not load_reference_config(str(tmp_path), rope_bf16_inv_freq=False).rope_bf16_inv_freq


def test_reference_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm_config.json"):
        load_reference_config(str(tmp_path))
    (tmp_path / "llm_config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(KeyError, match="num_hidden_layers.*vocab_size"):
        load_reference_config(str(tmp_path))


@pytest.mark.parametrize("name", ["lance_3b_image", "lance_3b_video", "tiny"])
def test_config_files(name):
    cfg = model_config_from_dict(config_dict_from_file(str(REPO / "configs" / "models" / f"{name}.py")).model)
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
    if name.startswith("lance_3b"):
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.intermediate_size) == (2048, 36, 2, 11008)
        assert cfg.mrope_section == (16, 24, 24) and cfg.rope_bf16_inv_freq
    if name == "lance_3b_video":
        assert cfg.max_latent_frames == 31


def test_validation():
    base = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=8, vocab_size=10,
                vocab_size_eff=10, mrope_section=[2, 3, 3])
    with pytest.raises(ValueError, match="mrope_section"):
        model_config_from_dict({**base, "mrope_section": [2, 2, 2]})
    with pytest.raises(ValueError, match="unknown model config keys"):
        model_config_from_dict({**base, "num_hiden_layers": 3})
    with pytest.raises(ValueError, match="attention_impl"):
        model_config_from_dict({**base, "attention_impl": "flash"})


def test_command_line_overrides():
    out = subprocess.run(
        [sys.executable, "-m", "lance_jax.config", "--config", str(REPO / "configs/models/tiny.py"),
         "--config.model.num_layers=2", "--config.model.dtype=bfloat16"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout
    shown = json.loads(out[: out.rindex("}") + 1])
    assert shown["num_layers"] == 2 and shown["dtype"] == "bfloat16"
    assert "parameters:" in out


def test_apply_overrides_reaches_list_entries():
    """`--config.data.groups[i].field=V` (the syntax train.py's config flags take) works in apply_overrides too;
    a missing field or index names the override."""
    from lance_jax.config import apply_overrides

    c = config_dict_from_file(str(REPO / "configs/train/tiny_synthetic.py"))
    apply_overrides(c, ["--config.data.groups[1].weight=0.25", "--config.train.steps=7"])
    assert c.data.groups[1]["weight"] == 0.25 and c.train.steps == 7
    assert c.data.groups[0]["weight"] != 0.25
    with pytest.raises(KeyError, match=r"groups has no entry \[9\]"):
        apply_overrides(c, ["--config.data.groups[9].weight=1.0"])
    with pytest.raises(KeyError, match="no config field 'grups'"):
        apply_overrides(c, ["--config.data.grups[0].weight=1.0"])

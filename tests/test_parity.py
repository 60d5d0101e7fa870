"""The parity harness against the golden set: every row of positions and train_forward must pass.

Tolerances live in lance_jax/parity.py (golden README's suggested checks, justified there).
"""
import json
import shutil

import numpy as np
import pytest

from lance_jax import parity


def _failed(rows):
    return "\n".join(r.format() for r in rows if not r.passed)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_train_forward_parity(golden, impl, capsys):
    overrides = {"attention_impl": impl, "attention_block_size": 128}
    rows = parity.run(golden.root, ["train_forward"], config_overrides=overrides)
    assert rows and all(r.passed for r in rows), _failed(rows)
    names = {r.name for r in rows}
    for required in ("llm_input_embeds", "time_embed", "latent_pos_embed", "position_ids", "last_hidden_state",
                     "ce_logits", "v_pred", "ce_per_token", "mse_per_elem", "ce_loss", "mse_loss", "loss"):
        assert required in names
    assert sum(n.startswith("hidden_layer") for n in names) == golden.model_config().num_layers


def test_cli_exit_code_and_table(golden, capsys):
    assert parity.main(["--golden", golden.root, "--cases", "positions"]) == 0
    out = capsys.readouterr().out
    assert "positions" in out and "PASS" in out and "FAIL" not in out


def test_cli_rejects_unknown_case(golden):
    with pytest.raises(SystemExit, match="unknown case"):
        parity.main(["--golden", golden.root, "--cases", "nonsense"])


def test_harness_detects_a_wrong_golden(golden, tmp_path, capsys):
    """A perturbed golden array must produce a FAIL row and a non-zero exit (the harness can fail)."""
    root = tmp_path / "golden"
    (root / "cases").mkdir(parents=True)
    shutil.copytree(golden.model_dir, root / "model")
    shutil.copy(f"{golden.root}/cases.json", root / "cases.json")
    z = dict(golden.arrays("train_forward"))
    z["hidden_layer1"] = z["hidden_layer1"] * (1 + 1e-3)
    z["position_ids"] = z["position_ids"].copy()
    z["position_ids"][0, 5] += 1
    np.savez(root / "cases" / "train_forward.npz", **z)
    meta = json.loads((root / "cases.json").read_text())
    meta["cases"]["train_forward"]["file"] = "cases/train_forward.npz"
    (root / "cases.json").write_text(json.dumps(meta))
    assert parity.main(["--golden", str(root), "--cases", "train_forward"]) == 1
    failed = {line.split()[1] for line in capsys.readouterr().out.splitlines() if line.endswith("FAIL")}
    assert failed == {"hidden_layer1", "position_ids"}


def test_compare_metric():
    g = np.array([1.0, -2.0, 4.0])
    assert parity.compare("c", "x", g + 3.9e-5, g, 1e-5).passed  # 3.9e-5 <= 1e-5 * max|g| = 4e-5
    assert not parity.compare("c", "x", g + 4.1e-5, g, 1e-5).passed
    assert not parity.compare("c", "x", g[:2], g, 1e-5).passed  # shape mismatch
    assert not parity.compare("c", "ids", np.array([1, 2]), np.array([1, 3]), 0.0).passed
    inf = np.array([-np.inf, 1.0])
    assert parity.compare("c", "t", inf, inf, 0.0).passed
    assert not parity.compare("c", "t", np.array([0.0, 1.0]), inf, 1e-5).passed


def test_nan_marks_must_match():
    g = np.array([np.nan, 1.0])
    assert parity.compare("c", "v", np.array([np.nan, 1.0]), g, 1e-5).passed
    assert not parity.compare("c", "v", np.array([0.0, 1.0]), g, 1e-5).passed

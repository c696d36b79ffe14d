"""The ``l2m-fast`` commands end to end on tiny budgets."""

import importlib.util

import pytest

from l2m_fast.cli import main


def test_demo_l2m_and_dropout(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "o"
    argv = ["demo", "--epochs", "50", "--samples", "20", "--out", str(out), "--methods", "l2m,mc_dropout"]
    assert main([*argv, "--no-progress"]) == 0
    text = capsys.readouterr().out
    for f in ("figure1.png", "regression.md", "regression.csv"):
        assert (out / f).is_file()
    assert f"figure: {out / 'figure1.png'}" in text
    assert "L2M (paper mode)" in text and "L2M (explicit mode)" in text and "MC dropout" in text
    assert "L2M (paper mode, sampled + calibrated)" in text and "L2M (explicit mode, linearized + calibrated)" in text
    assert "L2M (tracked Fisher" in text and "evidence gamma" in text
    assert len((out / "regression.csv").read_text().splitlines()) == 8


def test_demo_other_baselines_with_hmc_diagnostics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["demo", "--epochs", "20", "--samples", "8", "--out", str(tmp_path), "--no-progress"]
    argv += ["--methods", "rpf,ensemble,swag,hmc", "--ensemble-size", "2", "--hmc-samples", "16"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "HMC: acceptance" in text and "ESS" in text
    for name in ("Randomized prior functions", "Deep ensemble", "SWAG-diagonal"):
        assert name in text


def test_demo_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--methods", "nope", "--out", str(tmp_path), "--no-progress"])
    assert exc.value.code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--samples", "0"], "--samples: must be at least 1"),
        (["demo", "--epochs", "-3"], "--epochs: must be at least 1"),
        (["demo", "--methods", ","], "--methods names no method"),
        (["bench", "--repeats", "0"], "--repeats: must be at least 1"),
        (["bench", "--params", "x"], "expected a positive integer"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_classification(tmp_path, capsys):
    pytest.importorskip("sklearn")
    argv = ["eval", "classification", "--epochs", "2", "--samples", "4", "--ensemble-size", "2", "--seeds", "2"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    names = (
        "MAP", "Temperature-scaled MAP", "L2M paper, sampled", "L2M paper, linearized + calibrated",
        "L2M explicit, sampled + calibrated", "L2M explicit (evidence prior)", "L2M tracked Fisher",
        "L2M partial-pass Fisher", "MC dropout", "Deep ensemble", "L2M ensemble",
    )
    for name in names:
        assert name in text
    assert " ± " in text and (tmp_path / "classification_seeds.csv").is_file()
    assert "AUROC" in text and (tmp_path / "classification.csv").is_file()
    if importlib.util.find_spec("laplace") is None:
        assert "laplace-torch diagonal Laplace skipped" in text
    else:
        assert "laplace-torch diag" in text


def test_bench(capsys):
    assert main(["bench", "--params", "1000", "--samples", "4", "--repeats", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "torch " in text and "P=1,000, S=4" in text
    for v in ("fused op, out=", "fused op, allocating", "randn(S,P)", "naive per-sample loop", "copy_"):
        assert v in text

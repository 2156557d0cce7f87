"""reproduce.py: its commands parse (a dry run), without running them."""

import pytest

import reproduce
import retrain


def test_dry_run_parses_every_command(capsys):
    assert reproduce.main(["all", "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [c for stage in reproduce.STAGES.values() for c in stage]
    assert sum("--model gaussian" in c for c in printed) == 1 + len(reproduce.COLLAPSE_N)
    assert all(f"--model {m} " in " ".join(printed) for m in reproduce.DIGITS_MODELS)


def test_dry_run_rejects_a_broken_command(monkeypatch):
    monkeypatch.setitem(reproduce.STAGES, "theory", [f"{reproduce.PY} --model gaussian --lamda 1"])
    with pytest.raises(retrain.UserError):
        reproduce.main(["theory", "--dry-run"])

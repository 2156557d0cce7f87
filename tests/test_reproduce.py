"""reproduce.py: its commands parse (a dry run), the job pool keeps its order and limits, and a lambda
job started from a pretrained iteration 0 gives the numbers of the same lambda in one sweep."""

import json
import os
import shlex
import sys

import pytest

import reproduce
import retrain


def test_dry_run_parses_every_command(capsys):
    assert reproduce.main(["all", "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [job.cmd for stage in reproduce.STAGES.values() for job in stage]
    assert sum("--model gaussian" in c for c in printed) == (1 + len(reproduce.COLLAPSE_N)
                                                            + len(reproduce.STAGES["regimes-gaussian"]))
    for m in reproduce.DIGITS_MODELS:
        assert sum(f"--model {m} " in c for c in printed) == 1 + len(reproduce.DIGITS_LAMS)
    names = [job.name for stage in reproduce.STAGES.values() for job in stage]
    assert len(set(names)) == len(names)  # one log file each
    for job in reproduce.STAGES["digits"]:  # every lambda job starts from its model's iteration 0
        assert (job.after is None) == job.name.endswith("-pretrain")
        if job.after:
            assert f"--init {reproduce.RUNS}/digits-{job.name.split('-')[0]}/pretrain/iter0.pt" in job.cmd


def test_regimes_gaussian_commands(capsys):
    """The stage's dry run parses its commands, and each passes retrain.py's regime checks on its data: every
    pool fully synthetic, every real-data loop at every temperature, curation without and with the real set at
    a beta on either side of gaussian.py's fixed-point threshold (C5) for the data's variance."""
    import gaussian

    assert reproduce.main(["regimes-gaussian", "--dry-run"]) == 0
    jobs = reproduce.STAGES["regimes-gaussian"]
    assert capsys.readouterr().out.strip().splitlines() == [job.cmd for job in jobs]
    parsed = [retrain.build_parser().parse_args(shlex.split(job.cmd)[2:]) for job in jobs]
    for args in parsed:
        real = gaussian.make_data(args.dim, args.n_real)
        retrain.make_regime(args, args.data, real, [retrain.parse_lam(lam) for lam in args.lam])  # raises on a bad mix
        assert args.model == "gaussian" and args.dim == 1 and args.resume and len(args.seeds) >= 3
    assert len({args.out for args in parsed}) == len(parsed)
    pools = [a for a in parsed if a.pool != "replace" or (a.lam == ["inf"] and a.curate == 1)]
    loops = [a for a in parsed if a.lam == [str(reproduce.MAD_LAM)] and a.curate == 1]
    curated = [a for a in parsed if a.curate > 1]
    assert len(pools) + len(loops) + len(curated) == len(parsed)
    assert sorted(a.pool for a in pools) == sorted(reproduce.POOLS) and all(a.n_real == reproduce.POOL_N for a in pools)
    assert sorted((a.real, a.temperature) for a in loops) == sorted((r, t) for r in reproduce.REALS for t in reproduce.TAUS)
    assert {(a.lam[0], a.beta[0]) for a in curated} == {(lam, b) for lam in reproduce.CURATE_LAMS for b in reproduce.BETAS}
    assert all(a.reward == "linear" and a.curate == reproduce.CURATE_K for a in curated)
    v_real = gaussian.truth(1)[1].item()
    below, above = (gaussian.curated_real_fixed_point(1.0, b, v_real) for b in reproduce.BETAS)
    assert below is not None and above is None


def test_dry_run_rejects_a_broken_command(monkeypatch):
    monkeypatch.setitem(reproduce.STAGES, "theory", [reproduce.Job("bad", f"{reproduce.PY} --model gaussian --lamda 1")])
    with pytest.raises(retrain.UserError):
        reproduce.main(["theory", "--dry-run"])


def _sleeper(name, log, after=None, code=0):
    """A job that records its start and end times in `log` and exits with `code`."""
    src = (f"import time, sys; open({str(log)!r}, 'a').write(f'{name} start {{time.time()}}\\n'); time.sleep(0.3); "
           f"open({str(log)!r}, 'a').write(f'{name} end {{time.time()}}\\n'); sys.exit({code})")
    return reproduce.Job(name, f"python -c \"{src}\"", after)


def _events(log):
    out = {}
    for line in open(log):
        name, what, t = line.split()
        out[name, what] = float(t)
    return out


def test_job_pool_respects_order_and_limit(tmp_path):
    log = tmp_path / "events.txt"
    jobs = [_sleeper("a", log), _sleeper("b", log, after="a"), _sleeper("c", log), _sleeper("d", log)]
    code, spans = reproduce.run_jobs(jobs, workers=2, threads=1, logs=str(tmp_path / "logs"), poll=0.05)
    assert code == 0 and set(spans) == {"a", "b", "c", "d"}
    ev = _events(log)
    assert ev["b", "start"] >= ev["a", "end"]  # b waits for a
    times = sorted((t, +1 if what == "start" else -1) for (_, what), t in ev.items())
    running = [sum(d for _, d in times[:i + 1]) for i in range(len(times))]
    assert max(running) == 2  # two at a time, never three
    assert sorted(os.listdir(tmp_path / "logs")) == ["a.log", "b.log", "c.log", "d.log"]


def test_job_pool_stops_at_a_failure(tmp_path):
    log = tmp_path / "events.txt"
    jobs = [_sleeper("a", log, code=3), _sleeper("b", log, after="a")]
    code, spans = reproduce.run_jobs(jobs, workers=2, threads=1, logs=str(tmp_path / "logs"), poll=0.05)
    assert code == 3 and spans == {}
    assert ("b", "start") not in _events(log)  # the job waiting for the failed one never started
    with pytest.raises(ValueError):  # a job waiting for a job that is not in the list
        reproduce.run_jobs([_sleeper("x", log, after="nowhere")], 1, 1, str(tmp_path / "logs"), poll=0.05)


def test_lambda_job_from_iteration_0_equals_the_sweep(tmp_path):
    tiny = ["--model", "ddpm", "--preset", "small", "--data", "digits", "--n-real", "48", "--no-progress",
            "--set", "batch=16", "--set", "sample_steps=3", "--set", "kimg=0.032", "--set", "pretrain_kimg=0.048",
            "--set", "sample_batch=16"]
    assert retrain.main([*tiny, "--lam", "0", "1", "--iters", "2", "--out", str(tmp_path / "sweep")]) == 0
    assert retrain.main([*tiny, "--lam", "0", "--iters", "0", "--out", str(tmp_path / "pre")]) == 0
    assert retrain.main([*tiny, "--lam", "1", "--iters", "2", "--init", str(tmp_path / "pre" / "iter0.pt"),
                         "--out", str(tmp_path / "one")]) == 0
    keys = ("iter", "n_real", "n_synth", "loss", "fd", "precision", "recall")
    sweep = [json.loads(l) for l in open(tmp_path / "sweep" / "lam_1" / "metrics.jsonl")]
    one = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    assert len(one) == 3 and [{k: r.get(k) for k in keys} for r in one] == [{k: r.get(k) for k in keys} for r in sweep]

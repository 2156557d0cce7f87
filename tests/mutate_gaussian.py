"""Does a test catch every term of gaussian.py's closed forms? Each mutation below writes a wrong formula into a
copy of the project, runs the Gaussian's tests there, and must make at least one of them fail.

    python tests/mutate_gaussian.py        # one line per mutation; exit status 1 if any survives (a minute)

tests/test_gaussian.py runs this check too (test_every_mutation_of_the_closed_forms_is_caught).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_gaussian.py", "tests/test_regimes.py::test_gaussian_temperature_is_exact"]

# name: (the line as gaussian.py has it, the wrong one)
MUTATIONS = {
    "(R1) tau^2 -> tau in rho": ("rho = tau ** 2 * (n - 1) / (n - ddof)", "rho = tau * (n - 1) / (n - ddof)"),
    "(R2) tau^2 -> tau": ("return s2_0 * rho ** t, tau ** 2 * s2_0 / n * drift", "return s2_0 * rho ** t, tau * s2_0 / n * drift"),
    "(R2) tau^2 dropped": ("return s2_0 * rho ** t, tau ** 2 * s2_0 / n * drift", "return s2_0 * rho ** t, s2_0 / n * drift"),
    "(A1) tau^2 dropped": ("tau ** 2 * n_synth * s2 / (n_real", "n_synth * s2 / (n_real"),
    "(A1) E[s2_0] for every k": ("tau ** 2 * n_synth * s2 / (n_real", "tau ** 2 * n_synth * mean_s2[0] / (n_real"),
    "(P1) 1 + 2 lam -> 1 + lam": ("return lam * s2 / (n * (1 + 2 * lam))", "return lam * s2 / (n * (1 + lam))"),
    "(P2) 1 + lam -> 2 lam": ("return (1 + lam) * sigma2 / (n * (1 + 2 * lam))", "return 2 * lam * sigma2 / (n * (1 + 2 * lam))"),
    "(C5) lam (1 + lam) beta^2 -> 2 lam beta^2": ("c = lam * (1 + lam) * beta ** 2", "c = 2 * lam * beta ** 2"),
    "(C5) D_inf = lam beta s2 -> beta s2": ("return lam * beta * s2, s2", "return beta * s2, s2"),
    "(C5) D_inf = lam beta s2 -> 0": ("return lam * beta * s2, s2", "return 0.0, s2"),
    "(C3) tilt: beta s2 -> beta": ("return mu + self.beta[0] * s2, s2", "return mu + self.beta[0], s2"),
    "(C4) tilt: 1 + gamma s2 -> 1 + gamma": ("return mu / (1 + self.gamma * s2), s2 / (1 + self.gamma * s2)",
                                             "return mu / (1 + self.gamma), s2 / (1 + self.gamma * s2)"),
    "generate: tau -> sqrt(tau)": ("z = z * temperature", "z = z * temperature ** 0.5"),
}


def survivors(names=None) -> list[str]:
    """The mutations (all, or those named) that no test catches."""
    left = []
    source = (REPO / "gaussian.py").read_text()
    for name in names or MUTATIONS:
        right, wrong = MUTATIONS[name]
        assert source.count(right) == 1, f"{name}: '{right}' is not once in gaussian.py"
        with tempfile.TemporaryDirectory() as tmp:
            for f in [*REPO.glob("*.py"), *REPO.glob("tests/*.py"), REPO / "pytest.ini"]:
                (Path(tmp) / f.relative_to(REPO)).parent.mkdir(exist_ok=True)
                shutil.copy(f, Path(tmp) / f.relative_to(REPO))
            (Path(tmp) / "gaussian.py").write_text(source.replace(right, wrong))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider",
                                "-k", "not every_mutation", *TESTS], cwd=tmp, capture_output=True, text=True)
        caught = r.returncode == 1
        print(f"{'caught  ' if caught else 'SURVIVES'} {name}", flush=True)
        if not caught:
            left.append(name)
    return left


if __name__ == "__main__":
    sys.exit(1 if survivors() else 0)

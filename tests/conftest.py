"""Shared test settings: the tests' networks are tiny, so they run on one CPU thread. A second thread
gains them nothing, and on a machine whose cores are busy with other work it slows them many times
over. (Subprocesses started by the tests set OMP_NUM_THREADS=1 for the same reason.)"""

import os

import pytest
import torch

# retrain.py picks its CPU threads from the free cores unless OMP_NUM_THREADS says; in-process runs keep one
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory):
    """classifier.get's (net, info) for the digits' training split and the default Config, trained once per test process.
    Tests whose runs measure the digits in its space copy info["path"] into their run's cache folder, where
    retrain.py finds it by its hash."""
    import classifier
    import data

    return classifier.get(*data.load_labelled("digits"), str(tmp_path_factory.mktemp("classifier")))


@pytest.fixture
def digits_cache(tmp_path, digits_classifier):
    """tmp_path / "cache" holding the digits classifier: the cache folder of every run folder made in tmp_path,
    so their runs load it rather than train it again."""
    import shutil

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(digits_classifier[1]["path"], cache)
    return cache


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test (item.rep_setup, rep_call, rep_teardown): the GPU check's JSON record
    reads its outcome from there (tests/test_gpu_check.py)."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep

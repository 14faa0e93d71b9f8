import numpy  # noqa: F401  (loads NumPy's BLAS, whose pool is what the workers must limit)
import pytest
import scipy.linalg  # noqa: F401  (and SciPy's own copy)
from torch.utils.data import DataLoader, Dataset

from engine.loader import worker_init
from engine.threads import _cgroup_cpu_quota, available_cores, limit_native_threads, native_thread_counts


def test_worker_init_leaves_every_blas_and_openmp_pool_one_thread():
    before = native_thread_counts()
    if not before:
        pytest.skip("no BLAS or OpenMP runtime with a thread-count function is loaded here")
    # The parent of forked workers may run any number of BLAS threads (here: set to 2, the value
    # OMP_NUM_THREADS=1 in a test run would otherwise hide); the workers inherit it.
    limit_native_threads(2)
    assert set(native_thread_counts().values()) == {2}
    try:
        (in_worker,) = DataLoader(ThreadCounts(), batch_size=None, num_workers=1, worker_init_fn=worker_init)
        assert set(in_worker.values()) == {1}, in_worker
        assert in_worker.keys() == before.keys()
        assert any("blas" in name for name in in_worker)  # NumPy's and SciPy's OpenBLAS among them
    finally:
        limit_native_threads(max(before.values()))


class ThreadCounts(Dataset):
    """One item: the thread pools as the DataLoader worker that makes it sees them."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return native_thread_counts()


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2 without a limit
    ({"cpu.max": "250000 100000\n"}, 3),  # docker run --cpus 2.5: three cores busy at times
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1 without a limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ({}, None),  # no cgroup file system (macOS, an old kernel)
])
def test_a_cpu_quota_bounds_the_available_cores(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_cpu_quota(tmp_path) == expected
    assert 1 <= available_cores(tmp_path) <= (expected or 1024)

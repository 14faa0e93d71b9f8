"""The cores a process may use, and the native thread pools of the libraries it has loaded.

A DataLoader worker should run one thread of every kind: the workers are the parallelism. torch's
own pool is set with ``torch.set_num_threads``, but NumPy and SciPy call BLAS (OpenBLAS, MKL or
BLIS, each with its own pool, and SciPy's wheels bundle a second OpenBLAS beside NumPy's) from the
low-resolution augmentation and the elastic field. A forked worker inherits its parent's pool
sizes, and ``OMP_NUM_THREADS`` set after a library has loaded changes nothing, so the pools are set
through each library's own ``*_set_num_threads`` function, found in the shared objects this process
has mapped (/proc/self/maps), without a dependency such as threadpoolctl.
"""

import ctypes
import os
import re
from collections.abc import Callable
from pathlib import Path

# Shared objects that may hold a thread pool: OpenBLAS (plain, or renamed as in NumPy's and SciPy's
# wheels: libscipy_openblas64_-<hash>.so), MKL, BLIS and the OpenMP runtimes (GNU, Intel, LLVM).
_POOL_LIBRARY = re.compile(r"openblas|libmkl_rt|libblis|libgomp|libiomp|libomp")

# (set, get) per library kind. OpenBLAS's C functions; ILP64 builds add a suffix (64_) and NumPy's
# and SciPy's wheels a prefix (scipy_); the names with a trailing underscore are the Fortran ones,
# which take a pointer, and are left out.
_POOL_FUNCTIONS = (
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("bli_thread_set_num_threads", "bli_thread_get_num_threads"),
    ("omp_set_num_threads", "omp_get_max_threads"),
)


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity (set by ``taskset``, ``docker run
    --cpuset-cpus``, Slurm), further bounded by a CPU quota (``docker run --cpus``, a Kubernetes CPU
    limit), which the affinity does not show. ``os.cpu_count()`` counts the whole machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, quota)) if quota is not None else cores


def _cgroup_cpu_quota(root: Path) -> int | None:
    """Whole cores of the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up;
    None without a quota."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    return -(-int(quota) // int(period))


def _pool_functions() -> list[tuple[str, Callable, Callable]]:
    """(library file, set, get) for every thread-pool library loaded in this process, each function
    once even when several mapped files resolve to it."""
    if not Path("/proc/self/maps").is_file():
        return []  # not Linux: nothing to find the loaded libraries by
    paths = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}
    found, seen = [], set()
    for path in sorted(paths):
        if ".so" not in Path(path).name or not _POOL_LIBRARY.search(Path(path).name):
            continue
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)  # only ever a library already loaded
        except OSError:
            continue
        for set_name, get_name in _POOL_FUNCTIONS:
            setter, getter = getattr(library, set_name, None), getattr(library, get_name, None)
            if setter is None or getter is None:
                continue
            address = ctypes.cast(setter, ctypes.c_void_p).value
            if address in seen:
                continue
            seen.add(address)
            setter.argtypes, setter.restype, getter.argtypes, getter.restype = [ctypes.c_int], None, [], ctypes.c_int
            found.append((Path(path).name, setter, getter))
    return found


def limit_native_threads(count: int) -> list[str]:
    """Set the pool of every BLAS and OpenMP runtime loaded in this process to ``count`` threads.

    Returns:
        the library files whose pools were set (none where no such library is found).
    """
    functions = _pool_functions()
    for _, setter, _ in functions:
        setter(count)
    return [name for name, _, _ in functions]


def native_thread_counts() -> dict[str, int]:
    """``<library file>:<get function>`` -> the threads that pool would use now, for every BLAS and
    OpenMP runtime loaded."""
    return {f"{name}:{getter.__name__}": getter() for name, _, getter in _pool_functions()}

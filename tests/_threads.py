"""Running one call from many threads at once, for the thread-safety tests."""
import threading
from concurrent.futures import ThreadPoolExecutor


def run_threaded(fn, args_list, threads: int, timeout: float = 60.0):
    """``fn(*args)`` for ``threads`` jobs cycling over ``args_list``, all released together by a barrier.

    Returns ``(jobs, results)``: the args of each job and its result, in job order.
    """
    barrier = threading.Barrier(threads)

    def call(args):
        barrier.wait(timeout=timeout)
        return fn(*args)

    jobs = [args_list[i % len(args_list)] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return jobs, list(pool.map(call, jobs))

"""A `python -m gptjax.train` child for the fault tests (tests/faults/), with two test-only changes
made from outside the library:

  python tests/_fault_worker.py [--file-size-limit BYTES] [--slow-wait SECONDS] -- [CONFIG] [--key=value ...]

--file-size-limit makes every write past BYTES in any file fail with EFBIG (RLIMIT_FSIZE, SIGXFSZ
ignored), which the checkpoint writer meets exactly as it would meet a full disk. --slow-wait makes
every wait for a save in flight take SECONDS longer, after printing "test: waiting for a save", so a
signal can be sent while the run waits. And the CPU's peak FLOP/s, which only feeds the MFU
column, is neither measured (seconds of 2048^3 matmuls) nor kept in the tests' shared cache, whose
writes a file-size limit would make fail.
"""

import resource
import runpy
import signal
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    options, train_args = argv[:split], argv[split + 1 :]
    options = dict(zip(options[::2], options[1::2]))
    if "--file-size-limit" in options:
        limit = int(options["--file-size-limit"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if "--slow-wait" in options:
        import orbax.checkpoint as ocp

        delay, wait = float(options["--slow-wait"]), ocp.CheckpointManager.wait_until_finished

        def slow_wait(self):
            print("test: waiting for a save", file=sys.stderr, flush=True)
            time.sleep(delay)
            return wait(self)

        ocp.CheckpointManager.wait_until_finished = slow_wait
    import gptjax.perf

    gptjax.perf.recorded_peak_flops = lambda: (1e12, "not measured in the fault tests")
    sys.argv = ["gptjax.train", *train_args]
    runpy.run_module("gptjax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

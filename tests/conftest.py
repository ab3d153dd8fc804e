import os
import sys

# Fake CPU devices for the mesh tests (which use the first 8); must be set before jax is imported.
# Twice as many devices as any mesh uses, because XLA:CPU runs every device's collectives on one
# thread pool that seems to be sized by the device count: when all its threads block in rendezvous whose partners
# are still queued, the step deadlocks and XLA aborts the process after 40 s ("Termination
# timeout for `all reduce ...`"). With 8 fake devices an 8-device train step did that in 5 of 6
# runs on one core (and once in CI on two); with 16 it ran every time.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")
# Why a device can need two of those threads (found 2026-12-02, when the notebook's kernel, 4 devices
# and so 4 threads, hung for 5 minutes in a decode loop): XLA:CPU orders a device's collectives only
# by when they *start*, so a `lax.cond` whose branch holds a collective behind other work lets the
# next all-reduce start before the branch's collective-permute has; 3 devices' threads then waited
# at the permute and the 4th at the all-reduce, and the 4th device's permute had no thread left to
# run on. Processes that fake fewer devices for a mesh (the notebook's kernel, the README's API block)
# get 16 threads all the same through PJRT_NPROC, which sizes that pool (never below the device count)
# without adding devices: `dict(..., PJRT_NPROC=COLLECTIVE_THREADS)` in their environment.
COLLECTIVE_THREADS = "16"
# The tests' programs are tiny and most of the suite's time is XLA compiling them: LLVM's cheaper
# optimisation level compiles faster and changes nothing the tests compare (both sides of every
# comparison are compiled alike). So does leaving XLA:CPU's MLIR fusion emitters off (its older
# emitters instead): measured 2026-12-03 on one decode test, 238 programs, the backend's compile
# time fell from 28-34 s to 12 s and the test's from ~60 s to 37 s. Child processes inherit them;
# those that set their own XLA_FLAGS (one device, as a user's machine) add them too, all but the
# installed-package test, which keeps a user's default compiler. (A jaxlib that drops one of these
# flags aborts at start with "Unknown flags in XLA_FLAGS": remove it here.)
CHEAP_COMPILES = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                  " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] += " " + CHEAP_COMPILES
# XLA:CPU aborts the whole process when a device's thread reaches a collective about a minute after
# the others (a warning after 20 s, then "Termination timeout for `collective permute ...` of 40
# seconds exceeded"; by hand: a device 43 s late was waited for, one ~75 s late aborted the process,
# and with this flag it ran). On two cores shared with another test worker's multi-process tests,
# one fake device's share of a step can be that late. (The notebook kernel's death in a clean-clone CI
# run on 2026-12-02, first read as that, recurred with this flag as the 5-minute hang above.) A real
# deadlock still ends, after ~5 minutes. Processes given their own XLA_FLAGS add it too.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=300"
os.environ["XLA_FLAGS"] += " " + PATIENT_COLLECTIVES
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI keeps compiled programs in ~/.cache between calls; the tests write nowhere outside their
# temporary directories (tests/test_compilation_cache.py gives it one), and each compiles afresh.
os.environ["UNITOKEN_COMPILATION_CACHE"] = "off"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


class Chip:
    """An accelerator as the decode memory plan (`unitoken_jax.inference.fit`) sees it: its kind and
    its memory limit (what `jax.Device.memory_stats` reports as bytes_limit)."""

    def __init__(self, gib, kind="TPU v5 lite"):
        self.limit, self.device_kind = int(gib * 2**30), kind

    def memory_stats(self):
        return {"bytes_limit": self.limit}


def pytest_sessionfinish(session, exitstatus):
    """In CI (CI=true) every test extra is installed, so nothing may skip: a skip there means a
    test silently stopped proving anything, and the run fails, listing each skip and its reason."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reasons = [str(r.longrepr[2] if isinstance(r.longrepr, tuple) else r.longrepr) for r in skipped]
        lines = [f"  {r.nodeid}: {why.removeprefix('Skipped: ')}" for r, why in zip(skipped, reasons)]
        sys.stderr.write("\nCI runs every test: these skipped, which CI does not allow:\n" + "\n".join(lines) + "\n")
        session.exitstatus = 1

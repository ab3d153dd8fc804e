"""JAX's persistent compilation cache, which the command line turns on.

Every `unitoken` call starts a fresh process, and most of a short call is XLA compiling the same
programs as last time (the prefill, the decode loop's chunks, the VQ-GAN): with the cache, a
repeated call loads them from disk instead. A program's key covers its HLO, the JAX/XLA version,
the backend and the compile options, so a changed model, dtype or JAX release compiles afresh, and
XLA:CPU refuses an entry compiled for a CPU with other features.

Where the cache lives, first match wins: the `path` argument (the CLI's `--compilation-cache`),
$UNITOKEN_COMPILATION_CACHE, JAX's own setting ($JAX_COMPILATION_CACHE_DIR or
`jax.config.update("jax_compilation_cache_dir", ...)`), else `~/.cache/unitoken_jax/xla`
($XDG_CACHE_HOME respected), kept under 4 GiB. "off" turns it off; an empty variable counts as
unset. A `gs://` or `s3://` URL goes to JAX as it is (JAX reads and writes it through etils'
epath, which needs the store's extra installed), so the hosts of a pod share one cache; `file://`
is a local directory, taken by its real path (one reached through a symlink is the same cache). A
directory this process cannot write is used read only: its programs load, no new one is saved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

ENV = "UNITOKEN_COMPILATION_CACHE"
OFF = "off"
# what JAX caches by default are compiles of one second or more; this package's CLI calls are a few
# seconds made of many shorter compiles (the bundled model's generate: 5.0 s -> 3.8 s with JAX's
# threshold, 2.5 s caching every compile), and an entry is small
_MIN_COMPILE_SECONDS = 0.0
# JAX evicts the least recently used entries past this (and then locks the directory while it writes,
# so two calls at once cannot read a half-written entry); unbounded by default
MAX_BYTES = 4 * 1024**3
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"  # an entry's two files in JAX's cache directory
_NEVER_SAVED_SECONDS = 1e9  # a read-only cache's compile-time threshold: no program is saved
_CHECKED = ".unitoken_checked"  # its time: the entries written before it have been read whole (`_drop_damaged`)
_SET: dict = {}  # the values set here last (a later call may change them: they are not the user's)
_LOG = logging.getLogger(__name__)
# JAX's own defaults of the two settings tuned here: another value was set by the user (in Python,
# `jax.config.update`, or by an earlier call here) and is left as it is
_JAX_DEFAULTS = {"jax_persistent_cache_min_compile_time_secs": (1.0, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"),
                 "jax_compilation_cache_max_size": (-1, "JAX_COMPILATION_CACHE_MAX_SIZE")}


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unitoken_jax", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory, or None when it is off
    (asked for, or the directory cannot be made: then a warning, and the call runs without it)."""
    if path is None:
        path = os.environ.get(ENV) or None  # (set but empty: unset, as JAX reads its own variables)
    if path is None:
        own = jax.config.jax_compilation_cache_dir
        path = own if own else default_dir()
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"a compilation cache is a directory or {OFF!r}, not {path!r}")
    if path.strip().lower() == OFF:  # off, JAX's own setting too
        _off()
        return None
    if "://" in path:  # (a URL is JAX's to open: made local, gs://b became a folder 'gs:' here)
        scheme = path.split("://", 1)[0]
        if scheme == "file":
            path = path[len("file://"):]
        elif scheme not in ("gs", "s3"):  # what JAX's epath opens; another failed at the first compile
            raise ValueError(f"a compilation cache URL is gs://... or s3://... (lower case), not {path!r}")
    writable = True
    if "://" not in path:
        # the real path: JAX's key holds the directory (its GPU autotuning cache's place), and one cache
        # reached through a symlink had its every program compiled and stored again
        path = os.path.realpath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            _LOG.warning("no compilation cache (%s): every program compiles afresh", e)
            _off()  # (JAX's earlier directory would have gone on being written)
            return None
        writable = os.access(path, os.W_OK)
        if writable:
            _mend_orphans(path)
            _drop_damaged(path)
        else:  # (a size-bounded cache takes a lock file to read: two warnings a program, and no hit)
            _LOG.warning("compilation cache %s cannot be written: its programs are read, none is saved", path)
    jax.config.update("jax_compilation_cache_dir", path)
    tuned = ((_MIN_COMPILE_SECONDS, MAX_BYTES) if writable else
             (_NEVER_SAVED_SECONDS, -1))  # read only: no compile is long enough to save; no bound, no lock
    for name, value in zip(("jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size"), tuned):
        default, env = _JAX_DEFAULTS[name]
        if env not in os.environ and getattr(jax.config, name) in (default, _SET.get(name)):  # the user's own win
            jax.config.update(name, value)
            _SET[name] = value
    # JAX opens its cache at the first compile with a directory set and keeps writing there: a new
    # directory (a notebook's later cell) needs a reset to count
    jax_cache.reset_cache()
    return path


def _mend_orphans(path: str) -> None:
    """Gives every entry of a local cache that has its program (`KEY-cache`) but no access time
    (`KEY-atime`) the oldest one, 0: evicted first. JAX writes the two files one after the other, so
    a process stopped between them (a Ctrl-C during a compile's save) leaves such an entry, and JAX
    0.10's size-bounded cache then fails every later write ("Error writing persistent compilation
    cache entry ... -atime", a warning a compile) while its reads go on: the cache stopped growing
    for good (jax-ml/jax#39880, mended upstream in #39883 the same way)."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return
    for name in names:
        if name.endswith(_CACHE_SUFFIX) and name[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX not in names:
            with contextlib.suppress(OSError), open(os.path.join(path, name[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX),
                                                    "xb") as f:
                f.write((0).to_bytes(8, "little"))


def _drop_damaged(path: str) -> None:
    """Deletes the entries of a local cache whose program cannot be decompressed (cut short by a full
    disk or a killed write): JAX warns of such an entry ("Error reading persistent compilation cache
    entry ... truncated stream") and compiles the program again on every call, never replacing the
    file, since it only writes keys it does not have. Each entry is read once, by the first call
    after it was written (the entries since `_CHECKED`'s time; one younger than a minute, which may
    be being written now, is left to the next call)."""
    try:
        from jax._src.compilation_cache import decompress_executable  # (JAX's own format: zstd or zlib)
    except ImportError:  # another JAX: left as it is
        return
    marker = os.path.join(path, _CHECKED)
    started = time.time()
    try:
        since = os.path.getmtime(marker)
    except OSError:
        since = 0.0
    dropped = []
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        try:
            if not name.endswith(_CACHE_SUFFIX) or not since <= os.path.getmtime(entry) < started - 60.0:
                continue
            with open(entry, "rb") as f:
                decompress_executable(f.read())
        except OSError:
            continue
        except Exception:  # (zlib.error, zstd's ZstdError: the stream is cut or damaged)
            dropped.append(name)
            for gone in (entry, entry[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX):
                with contextlib.suppress(OSError):
                    os.remove(gone)
    with contextlib.suppress(OSError), open(marker, "w"):
        pass
    with contextlib.suppress(OSError):
        os.utime(marker, (started - 60.0, started - 60.0))
    if dropped:
        _LOG.warning("compilation cache %s: %d damaged program(s) deleted (cut short: a full disk or a stopped "
                     "write); they compile again", path, len(dropped))


def _off() -> None:
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()


_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_cache_hits():
    """Counts the programs JAX loads from the cache inside the block: `with count_cache_hits() as
    hits: ...; hits[0]`."""
    hits = [0]

    def listener(event: str, **kwargs) -> None:
        if event == _HIT_EVENT:
            hits[0] += 1

    jax.monitoring.register_event_listener(listener)
    try:
        yield hits
    finally:
        jax.monitoring.unregister_event_listener(listener)

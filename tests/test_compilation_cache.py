"""The CLI's persistent compilation cache: where it goes, and that a second call loads what the
first compiled and gives the same output."""

import os
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from unitoken_jax.inference import compilation_cache as cc
from unitoken_jax.world import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_compilation_cache_max_size")


@pytest.fixture
def jax_settings(monkeypatch):
    """The test changes JAX's global cache settings: they are put back (and JAX's cache reset) after."""
    saved = {k: getattr(jax.config, k) for k in SETTINGS}
    for name in (cc.ENV, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_COMPILATION_CACHE_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # JAX's defaults
    jax.config.update("jax_compilation_cache_max_size", -1)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    jax_cache.reset_cache()


def test_where_the_cache_goes(jax_settings, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # nothing set: under $XDG_CACHE_HOME, every compile kept, the size bounded
    assert cc.enable_compilation_cache() == str(tmp_path / "xdg" / "unitoken_jax" / "xla")
    assert os.path.isdir(tmp_path / "xdg" / "unitoken_jax" / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "unitoken_jax" / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert 0 < jax.config.jax_compilation_cache_max_size < 2**40
    # JAX's own setting wins over the default
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    assert cc.enable_compilation_cache() == str(tmp_path / "jax")
    # the environment variable over that, the argument over everything
    monkeypatch.setenv(cc.ENV, str(tmp_path / "env"))
    assert cc.enable_compilation_cache() == str(tmp_path / "env")
    assert cc.enable_compilation_cache(str(tmp_path / "arg")) == str(tmp_path / "arg")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "arg")
    # off, in any case, turns it off, JAX's own setting included
    for off in ("off", "OFF"):
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
        assert cc.enable_compilation_cache(off) is None
        assert jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    monkeypatch.setenv(cc.ENV, "off")
    assert cc.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    with pytest.raises(ValueError, match="directory or 'off'"):
        cc.enable_compilation_cache("  ")
    # set but empty: unset (every verb stopped with "not ''"), as JAX reads its own variables
    monkeypatch.setenv(cc.ENV, "")
    jax.config.update("jax_compilation_cache_dir", None)
    assert cc.enable_compilation_cache() == str(tmp_path / "xdg" / "unitoken_jax" / "xla")


def test_a_url_goes_to_jax_as_it_is(jax_settings, monkeypatch, tmp_path):
    """gs://bucket/xla (JAX's own setting, or ours) became a local folder 'gs:/bucket/xla' under the
    working directory, silently: each host of a pod got a cache of its own."""
    monkeypatch.chdir(tmp_path)
    assert cc.enable_compilation_cache("gs://bucket/xla") == "gs://bucket/xla"
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/xla"
    assert os.listdir(tmp_path) == []
    # file:// is a local directory; another scheme (or GS://) failed at the first compile, inside JAX
    assert cc.enable_compilation_cache(f"file://{tmp_path}/local") == str(tmp_path / "local")
    for url in ("GS://bucket/xla", "http://host/xla"):
        with pytest.raises(ValueError, match="a compilation cache URL is gs://... or s3://..."):
            cc.enable_compilation_cache(url)


def test_the_users_own_jax_thresholds_are_kept(jax_settings, monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    jax.config.update("jax_compilation_cache_max_size", -1)
    cc.enable_compilation_cache(str(tmp_path))
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
    assert jax.config.jax_compilation_cache_max_size == -1
    # and made in Python (a notebook's jax.config.update): they were overwritten
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
    jax.config.update("jax_compilation_cache_max_size", 2**20)
    cc.enable_compilation_cache(str(tmp_path))
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 5.0
    assert jax.config.jax_compilation_cache_max_size == 2**20


def test_a_new_directory_takes_effect_after_programs_compiled_into_the_old_one(jax_settings, tmp_path):
    """JAX opens its cache once, at the first compile with a directory set (a notebook that turns
    the cache on, or points it elsewhere, after an earlier cell compiled)."""
    cc.enable_compilation_cache(str(tmp_path / "a"))
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(3)).block_until_ready()
    assert any(p.endswith("-cache") for p in os.listdir(tmp_path / "a"))
    cc.enable_compilation_cache(str(tmp_path / "b"))
    jax.jit(lambda x: x * 5 - 2)(jax.numpy.ones(7)).block_until_ready()
    assert any(p.endswith("-cache") for p in os.listdir(tmp_path / "b"))


def test_an_entry_left_without_its_access_time_does_not_stop_the_cache_growing(jax_settings, tmp_path):
    """A process stopped between JAX's two writes of an entry (its program, then its access time)
    left a `-cache` file alone, and every later write failed with a warning: the cache kept its
    old programs and saved no new one."""
    import warnings

    where = tmp_path / "xla"
    where.mkdir()
    (where / "jit_stopped-0123abcd-cache").write_bytes(b"a program whose access time was never written")
    cc.enable_compilation_cache(str(where))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(lambda x: x * 11 - 4)(jax.numpy.ones(5)).block_until_ready()
    assert not [w for w in caught if "persistent compilation cache" in str(w.message)], [str(w.message) for w in caught]
    saved = [p for p in os.listdir(where) if p.endswith("-cache") and "stopped" not in p]
    assert saved and all((where / (p[:-len("-cache")] + "-atime")).exists() for p in saved)


def test_a_program_cut_short_is_deleted_once_and_compiled_again(jax_settings, tmp_path, caplog):
    """An entry cut short (a full disk, a killed write) warned "Error reading persistent compilation
    cache entry" and recompiled on every call, never replaced (JAX writes only keys it lacks)."""
    import time
    import warnings

    where = tmp_path / "xla"
    cc.enable_compilation_cache(str(where))
    ones = jax.numpy.ones(3)
    saved = []
    for f in (lambda x: x * 23 + 1, lambda x: x * 29 - 1):
        before = set(os.listdir(where))
        jax.jit(f)(ones).block_until_ready()
        (new,) = [p for p in set(os.listdir(where)) - before if p.endswith("-cache")]
        saved.append(new)
    cut, whole = saved
    (where / cut).write_bytes((where / cut).read_bytes()[:40])
    a_while_ago = time.time() - 600  # (an entry younger than a minute may be being written: left)
    for entry in os.listdir(where):
        os.utime(where / entry, (a_while_ago, a_while_ago))
    with caplog.at_level("WARNING"):
        cc.enable_compilation_cache(str(where))
    assert "1 damaged program(s) deleted" in caplog.text
    assert not (where / cut).exists() and (where / whole).exists()
    jax.jit(lambda x: x * 23 + 1)(ones).block_until_ready()  # compiled again and saved
    caplog.clear()
    cc.enable_compilation_cache(str(where))  # (the next call reads only what is new since: nothing to say)
    assert "damaged" not in caplog.text
    with warnings.catch_warnings(record=True) as caught, cc.count_cache_hits() as hits:
        warnings.simplefilter("always")
        jax.jit(lambda x: x * 23 + 1)(ones).block_until_ready()
        jax.jit(lambda x: x * 29 - 1)(ones).block_until_ready()
    assert hits[0] == 2 and not [w for w in caught if "compilation cache" in str(w.message)]


def test_a_cache_reached_through_a_symlink_is_the_same_cache(jax_settings, tmp_path):
    """JAX's key holds the cache's directory: through a symlink every program compiled and was
    stored again (twice the entries, no hit)."""
    real = tmp_path / "real"
    cc.enable_compilation_cache(str(real))
    jax.jit(lambda x: x * 13 + 2)(jax.numpy.ones(3)).block_until_ready()
    entries = sorted(os.listdir(real))
    os.symlink(real, tmp_path / "link")
    assert cc.enable_compilation_cache(str(tmp_path / "link")) == str(real)
    with cc.count_cache_hits() as hits:
        jax.jit(lambda x: x * 13 + 2)(jax.numpy.ones(3)).block_until_ready()
    assert hits[0] >= 1 and sorted(os.listdir(real)) == entries


def test_a_directory_that_cannot_be_written_is_read_and_never_written(jax_settings, tmp_path, monkeypatch, caplog):
    """A read-only cache (a shared, warmed one) gave two warnings a program ('Read-only file system:
    .lockfile', the size bound's lock taken to read) and no hit."""
    where = tmp_path / "xla"
    cc.enable_compilation_cache(str(where))
    jax.jit(lambda x: x * 17 - 5)(jax.numpy.ones(3)).block_until_ready()
    entries = sorted(os.listdir(where))
    monkeypatch.setattr(cc.os, "access", lambda path, mode: False)  # (root writes anywhere: said so here)
    with caplog.at_level("WARNING"):
        cc.enable_compilation_cache(str(where))
    assert "cannot be written: its programs are read, none is saved" in caplog.text
    assert jax.config.jax_compilation_cache_max_size == -1  # no bound: no lock file to take
    with cc.count_cache_hits() as hits:
        jax.jit(lambda x: x * 17 - 5)(jax.numpy.ones(3)).block_until_ready()
        jax.jit(lambda x: x * 19 + 7)(jax.numpy.ones(3)).block_until_ready()  # new: not saved
    assert hits[0] >= 1 and sorted(os.listdir(where)) == entries
    monkeypatch.undo()
    cc.enable_compilation_cache(str(where))  # writable again: the settings made for a read-only one go
    assert jax.config.jax_compilation_cache_max_size == cc.MAX_BYTES


def test_a_directory_that_cannot_be_made_means_no_cache_and_a_warning(jax_settings, tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    cc.enable_compilation_cache(str(tmp_path / "earlier"))  # (it went on being written: now off too)
    with caplog.at_level("WARNING"):
        assert cc.enable_compilation_cache(str(tmp_path / "file" / "xla")) is None
    assert "no compilation cache" in caplog.text
    assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.skipif(not default.available(), reason="this install has no bundled model")
def test_a_second_cli_call_loads_the_first_ones_programs(tmp_path):
    cache = tmp_path / "xla"
    env = dict(os.environ, JAX_DEBUG_LOG_MODULES="jax._src.compiler")
    env.pop(cc.ENV, None)

    def start(out):
        cmd = [sys.executable, "-m", "unitoken_jax.cli", "generate", "a red circle at the top left", "--out",
               str(tmp_path / out), "--compilation-cache", str(cache)]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(process):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        return err

    # two calls at once fill one fresh cache (JAX locks it while writing)
    first, other = start("first.png"), start("other.png")
    first, other = finish(first), finish(other)
    entries = [p for p in os.listdir(cache) if p.endswith("-cache")]
    assert entries, "the first calls kept no compiled program"
    assert f"compilation cache: {cache}" in first
    # the CLI's own INFO lines reach the terminal (what the bundled model knows)
    assert "knows only the shapes world" in first
    second = finish(start("second.png"))
    assert second.count("Persistent compilation cache hit") >= len(entries) // 2, second[-3000:]
    pictures = {(tmp_path / name).read_bytes() for name in ("first.png", "other.png", "second.png")}
    assert len(pictures) == 1

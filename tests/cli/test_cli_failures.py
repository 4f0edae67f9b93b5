"""What a user sees when a command meets a bad device, a read-only or full disk, a relative index
path, repeated timesteps or queries of another size: one line, the file and the cause, exit 1."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from nda_ann.cli import main
from nda_ann.corpus.store import Store, write_store
from nda_ann.index import build_index

R = 16
DEVICE_LINE = re.compile(r"^device: (cpu \(\d+ threads|cuda:\d+ \([^,)]*)(, [\w ()\-,]+)?\), faiss \d+\.\d+\.\d+ [A-Za-z][\w-]*",
                         re.MULTILINE)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two 16x16 stores of 12 images, an index of the first, a folder of PNGs and two queries
    (one of the store's size, one at 32x32)."""
    root = tmp_path_factory.mktemp("cli_failures")
    rng = np.random.default_rng(14)
    a, b = (rng.integers(0, 256, (12, R, R, 3), dtype=np.uint8) for _ in range(2))
    write_store(root / "store", a)
    write_store(root / "store2", b)
    build_index(Store.open(root / "store"), root / "index", ["5"], progress=False)
    (root / "imgs").mkdir()
    for i, img in enumerate(a[:6]):
        Image.fromarray(img).save(root / "imgs" / f"{i}.png")
    (root / "q").mkdir()
    Image.fromarray(a[4]).save(root / "q" / "same.png")
    Image.fromarray(a[7]).resize((2 * R, 2 * R), Image.Resampling.NEAREST).save(root / "q" / "big.png")
    return root


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *parts: str) -> str:
    """Exit 1 through click (no exception escaped), and an 'Error:' line holding every part."""
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exception, r.output)
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and all(p in errors[0] for p in parts), r.output
    assert "Traceback" not in r.output
    return errors[0]


# item 2: a path with a folder part is used as given --------------------------------------------------

def test_build_and_add_at_a_dot_slash_path_publish_there_and_succeed(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("build", case / "store", "./NAME", "--scale", "5", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "NAME" / "manifest.json").is_file() and not (tmp_path / "indexes").exists()
    assert f"{tmp_path / 'NAME'}: 12 images" in r.output
    r = run("add", "./NAME", case / "store2", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "24 images in 2 store(s)" in r.output
    assert run("info", "./NAME").exit_code == 0
    assert json.loads((tmp_path / "NAME" / "manifest.json").read_text())["count"] == 24


# item 5: the device is validated ----------------------------------------------------------------------

def test_an_unknown_or_absent_device_is_a_one_line_error(case, tmp_path):
    from nda_ann import Attributor

    for command in (["attribute", case / "index", case / "q" / "same.png", "--out", tmp_path / "o"],
                    ["attribute", "--exact", case / "store", case / "q" / "same.png", "--scale", "5", "--out", tmp_path / "o"],
                    ["compare", case / "index", case / "q" / "same.png"],
                    ["demo", "--out", tmp_path / "d", "--n-train", "5"]):
        one_line_error(run(*command, "--device", "banana"), "unknown device 'banana'", "auto, cpu, cuda or cuda:<i>")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        Attributor.open(case / "index", device="banana")
    if not torch.cuda.is_available():
        one_line_error(run("attribute", case / "index", case / "q" / "same.png", "--out", tmp_path / "o", "--device", "cuda:1"), "no CUDA GPU")


# item 9: every computing command prints its device line ----------------------------------------------

def test_every_computing_command_prints_one_device_line(case, tmp_path):
    import faiss

    commands = {
        "ingest": ["ingest", case / "imgs", tmp_path / "s", "-r", R, "--workers", "0", "--no-progress"],
        "build": ["build", case / "store", tmp_path / "ix", "--scale", "5", "--no-progress"],
        "add": ["add", tmp_path / "ix", case / "store2", "--no-progress"],
        "attribute": ["attribute", tmp_path / "ix", case / "q" / "same.png", "--k", "16", "--out", tmp_path / "o1"],
        "exact": ["attribute", "--exact", case / "store", case / "q" / "same.png", "--scale", "5", "--out", tmp_path / "o2"],
        "compare": ["compare", case / "index", case / "q" / "same.png", "--k", "16"],
        "demo": ["demo", "--out", tmp_path / "demo", "--n-train", "30", "--queries", "1", "--scale", "3"],
    }
    for name, command in commands.items():
        r = run(*command)
        assert r.exit_code == 0, (name, r.output)
        lines = DEVICE_LINE.findall(r.output)
        assert len(lines) == 1, (name, r.output)
        assert f"faiss {faiss.__version__} " in r.output, name
    assert "float64" in run("attribute", "--exact", case / "store", case / "q" / "same.png", "--scale", "5", "--out", tmp_path / "o3").output


# item 7: repeated timesteps, queries of another size --------------------------------------------------

def test_a_repeated_timestep_is_used_once_with_a_warning(case, tmp_path):
    r = run("attribute", case / "index", case / "q" / "same.png", "-t", "100", "-t", "300", "-t", "100", "--k", "16", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "warning: timestep(s) 100 given more than once; each is used once: -t 100 -t 300" in r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["timesteps"] == [100, 300]


def test_queries_of_another_size_are_recorded_and_warned_or_refused(case, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="nda_ann.corpus.queries"):  # the CLI logs warnings to stderr
        r = run("attribute", case / "index", case / "q", "--k", "16", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert re.search(r"1 query of another size than the corpus' 16x16 resized.*big\.png \(32x32\)", caplog.text), caplog.text
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["resized_queries"] == [{"query": "big.png", "size": [32, 32], "resized_to": [16, 16]}]
    r = run("attribute", case / "index", case / "q" / "same.png", "--k", "16", "--out", tmp_path / "o2")
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["resized_queries"] == []
    one_line_error(run("attribute", case / "index", case / "q", "--no-resize", "--out", tmp_path / "o3"),
                   "big.png is 32x32 but the corpus holds 16x16 images")
    assert not (tmp_path / "o3").exists()


# item 6: read-only folders and full disks --------------------------------------------------------------

def _mount(path: Path, options: str) -> bool:
    """Mount a tmpfs at ``path`` (as root where the kernel allows it); False where it cannot."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"nda-ann-test-{uuid.uuid4().hex[:6]}", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written into: chmod 555 for a normal user; as root (who ignores
    permissions) a read-only tmpfs, or a skip where mounting is not permitted."""
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
        yield ro, "Permission denied [EACCES]"
        ro.chmod(0o755)
    elif _mount(ro, "ro,size=1m"):
        yield ro, "Read-only file system [EROFS]"
        _umount(ro)
    else:
        pytest.skip("root without permission to mount a tmpfs: no read-only folder to try (the injected tests cover it)")


def test_a_read_only_target_is_a_one_line_error_naming_it_for_every_command(case, read_only):
    ro, cause = read_only
    for name, command in {"ingest": ["ingest", case / "imgs", ro / "s", "-r", R, "--workers", "0", "--no-progress"],
                          "build": ["build", case / "store", ro / "ix", "--scale", "5", "--no-progress"],
                          "attribute": ["attribute", case / "index", case / "q" / "same.png", "--k", "16", "--out", ro / "out"],
                          "demo": ["demo", "--out", ro / "demo", "--n-train", "5"]}.items():
        line = one_line_error(run(*command), cause, "choose a writable location")
        assert str(ro) in line, (name, line)
    assert os.listdir(ro) == []
    r = run("attribute", case / "index", case / "q" / "same.png", "--k", "16", "--out", ro / "out")
    assert "attribute:" not in r.output  # refused before the work, not after it


@pytest.fixture
def full_disk(tmp_path):
    """A 16 KiB tmpfs: every command's output overflows it (real ENOSPC); a skip where it cannot be mounted."""
    full = tmp_path / "full"
    if not _mount(full, "size=16k"):
        pytest.skip("no permission to mount a tmpfs (the injected ENOSPC tests cover a full disk)")
    yield full
    _umount(full)


def test_a_full_disk_is_a_one_line_error_and_publishes_nothing(case, full_disk):
    for name, command in {"ingest": ["ingest", case / "imgs", full_disk / "s", "-r", R, "--workers", "0", "--no-progress"],
                          "build": ["build", case / "store", full_disk / "ix", "--scale", "5", "--no-progress"],
                          "attribute": ["attribute", case / "index", case / "q" / "same.png", "--k", "16", "--out", full_disk / "out"]}.items():
        line = one_line_error(run(*command), "No space left on device [ENOSPC]", "free space and run the command again")
        assert str(full_disk) in line, (name, line)
    assert not any((full_disk / n).exists() for n in ("s", "ix", "out"))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _faiss_enospc(index, path, *args):
    raise RuntimeError(f"Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: "
                       f"Error: 'ret == (size * 4)' failed: write error in {path}: 4051 != 320000 (No space left on device)")


def _eacces(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/.out.staging-0000")


def test_injected_write_failures_are_one_line_errors_for_ingest_build_and_attribute(case, tmp_path, monkeypatch):
    """The same faults without a mount (CI as root): ENOSPC from the pixel writer (no file named),
    FAISS's RuntimeError for a full disk, and EACCES from the results folder's staging."""
    import importlib

    import faiss

    ingest_mod = importlib.import_module("nda_ann.corpus.ingest")  # the module, not the function
    report_mod = importlib.import_module("nda_ann.results.report")

    with monkeypatch.context() as m:
        m.setattr(ingest_mod, "_fsync_write", _enospc)
        one_line_error(run("ingest", case / "imgs", tmp_path / "s", "-r", R, "--workers", "0", "--no-progress"),
                       f"{tmp_path / 's'}: No space left on device [ENOSPC]: free space")
    with monkeypatch.context() as m:
        m.setattr(faiss, "write_index", _faiss_enospc)
        line = one_line_error(run("build", case / "store", tmp_path / "ix", "--scale", "5", "--factory", "IVF4,Flat", "--no-progress"),
                              "No space left on device [ENOSPC]", f"nothing was written to {tmp_path / 'ix'}")
        assert re.search(r"class-\d+\.faiss\.tmp", line), line  # the FAISS file that failed
    with monkeypatch.context() as m:
        m.setattr(report_mod, "staging_dir", _eacces)
        one_line_error(run("attribute", case / "index", case / "q" / "same.png", "--k", "16", "--out", tmp_path / "out"),
                       "/somewhere/.out.staging-0000: Permission denied [EACCES]", f"nothing was written to {tmp_path / 'out'}")
    assert not any((tmp_path / n).exists() for n in ("s", "ix", "out"))


def test_faiss_write_errors_become_the_oserror_they_were(tmp_path, monkeypatch):
    import faiss

    from nda_ann.index.train import write_index_atomic

    with pytest.raises(FileNotFoundError) as err:
        write_index_atomic(faiss.IndexFlatL2(4), tmp_path / "missing" / "x.faiss")
    assert err.value.errno == errno.ENOENT and err.value.filename == str(tmp_path / "missing" / ".x.faiss.tmp")
    monkeypatch.setattr(faiss, "write_index", _faiss_enospc)
    with pytest.raises(OSError) as err:
        write_index_atomic(faiss.IndexFlatL2(4), tmp_path / "x.faiss")
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


# item 1 (outside the Attributor): numbers a user gives that would size an allocation --------------

def test_sizes_that_would_not_fit_in_memory_are_refused_before_allocating(case, tmp_path, monkeypatch):
    import importlib

    for args, parts in ((("-r", 100_000), ("resolution 100000", "28,610 MiB", "smaller --resolution")),
                        (("-r", 4096, "--batch-size", 1000), ("batch size 1000", "46.9 GiB", "lower --batch-size"))):
        one_line_error(run("ingest", case / "imgs", tmp_path / "s", *args, "--no-progress"), *parts)
    assert not (tmp_path / "s").exists()
    r = run("demo", "--out", tmp_path / "d", "--n-train", 10**9)
    assert r.exit_code == 2 and "1000000000 is not in the range" in r.output
    demo_mod = importlib.import_module("nda_ann.demo")

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 2.79 TiB for an array with shape (1000000000, 32, 32, 3)")
    monkeypatch.setattr(demo_mod, "demo_corpus", no_memory)
    one_line_error(run("demo", "--out", tmp_path / "d", "--n-train", 5), "not enough memory (Unable to allocate 2.79 TiB", "--n-train")

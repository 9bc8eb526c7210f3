"""Writes that fail for real: a full disk (a small tmpfs, or an fsync failing with ENOSPC or EDQUOT), read-only
folders (read-only bind mounts: root ignores chmod), an output path that is a file; and a metrics.jsonl whose
last line a kill cut. Each failing case exits 2 with one `error:` line naming the path, no traceback, no
temporary file left, and every earlier file byte-identical and loadable (metrics.jsonl: its earlier rows)."""
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults_testutil import (
    DEMO,
    assert_one_line_error,
    assert_unchanged,
    gesso_cli,
    leave_free,
    loadable,
    read_only,
    snapshot,
    temp_litter,
    tmpfs,
)
from PIL import Image
from safetensors.torch import save_file

from gesso.engine.config.load import load_config
from gesso.engine.io import write_atomic, write_bytes_atomic
from gesso.engine.loop.train import train
from gesso.engine.run.events import StopTraining
from gesso.engine.run.logs import Board, RunLog
from gesso.engine.sampling.render import save_png
from gesso.errors import OutputError

# 12 images x 1 repeat / batch 4 = 3 steps an epoch at 64 px, one preview per epoch: every kind of file, quickly
SMALL = ["dataset.repeats=1", "dataset.resolution=64", "sample.steps=4", "sample.every_n_epochs=1", "output.tensorboard=false",
         "output.save_dtype='fp32'"]

# cli.main with os.fsync failing for the temp file of one name: the data is written, the sync reports the error
# (as delayed allocation and NFS report a full disk), and write_atomic must not rename it into place
FAILING_FSYNC = """
import errno, os, sys
from gesso import cli
name, code = sys.argv[1], getattr(errno, sys.argv[2])
real_fsync = os.fsync
def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
        raise OSError(code, os.strerror(code))
    real_fsync(fd)
os.fsync = fsync
sys.exit(cli.main(sys.argv[3:]))
"""


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # filled by the first run: the others start without encoding


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory, cache) -> Path:
    """A finished one-epoch run: demo-000001, demo, state.pt, metrics.jsonl, samples/demo-e000001-00.png."""
    run = tmp_path_factory.mktemp("first") / "run"
    proc = gesso_cli("train", DEMO, "--output-dir", run, *sets(*SMALL, "train.epochs=1", f"dataset.cache_dir='{cache}'"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def second_epoch(run: Path, cache: Path) -> list:
    """`train` arguments resuming `run` for a second epoch: it saves demo-000002, then state.pt, then a preview."""
    return ["train", DEMO, "--resume", run, *sets(*SMALL, "train.epochs=2", f"dataset.cache_dir='{cache}'")]


def cli_with_failing_fsync(wrapper: Path, name: str, code: str, args: list) -> subprocess.CompletedProcess:
    wrapper.write_text(FAILING_FSYNC)
    return subprocess.run([sys.executable, str(wrapper), name, code, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def earlier(run: Path) -> tuple[dict[Path, bytes], bytes]:
    """The run's files but metrics.jsonl (the resumed run appends rows to it before it fails), and its rows."""
    files = snapshot(run)
    rows = files.pop(run / "metrics.jsonl")
    assert {p.name for p in files} >= {"demo-000001.safetensors", "demo.safetensors", "state.pt", "demo-e000001-00.png"}
    return files, rows


def assert_nothing_lost(run: Path, files: dict[Path, bytes], rows: bytes) -> None:
    assert_unchanged(files)
    metrics = (run / "metrics.jsonl").read_bytes()
    assert metrics.startswith(rows) and metrics.endswith(b"\n")
    loadable(run / "metrics.jsonl")
    assert temp_litter(run) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-000002.safetensors", "state.pt"])  # each save path, after an earlier file
def test_a_full_tmpfs_fails_the_save_with_one_line_and_keeps_the_earlier_files(tmp_path, cache, first_epoch, name):
    with tmpfs(tmp_path / "disk") as disk:
        run = disk / "run"
        shutil.copytree(first_epoch, run)
        files, rows = earlier(run)
        lora, state = (run / "demo-000001.safetensors").stat().st_size, (run / "state.pt").stat().st_size
        # room for half a LoRA file; or for the LoRA file and half a state
        leave_free(disk, lora // 2 if name.endswith(".safetensors") else lora + state // 2)
        proc = gesso_cli(*second_epoch(run, cache))
        assert_one_line_error(proc, run / name, "no space left")
        assert_nothing_lost(run, files, rows)
        if name == "state.pt":  # the LoRA file before it fitted, and is whole
            loadable(run / "demo-000002.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("demo-000002.safetensors", "ENOSPC"), ("state.pt", "EDQUOT")])
def test_a_failing_fsync_fails_the_save_with_one_line_and_keeps_the_earlier_files(tmp_path, cache, first_epoch, name, code):
    run = tmp_path / "run"
    shutil.copytree(first_epoch, run)
    files, rows = earlier(run)
    proc = cli_with_failing_fsync(tmp_path / "failing_fsync.py", name, code, second_epoch(run, cache))
    assert_one_line_error(proc, run / name, "no space left")
    assert_nothing_lost(run, files, rows)  # state.pt among them: the earlier one
    if name != "state.pt":
        assert not (run / name).exists()


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line_and_nothing_changes(tmp_path, cache, first_epoch):
    run = tmp_path / "run"
    shutil.copytree(first_epoch, run)
    before = snapshot(run)
    with read_only(run):
        proc = gesso_cli(*second_epoch(run, cache))
    assert_one_line_error(proc, run)
    assert_unchanged(before)
    assert snapshot(run).keys() == before.keys()


@pytest.mark.slow
def test_a_read_only_samples_folder_fails_the_preview_after_the_epochs_files(tmp_path, cache, first_epoch):
    run = tmp_path / "run"
    shutil.copytree(first_epoch, run)
    files, rows = earlier(run)
    # the epoch's LoRA file and state come before its preview: state.pt is replaced, whole, by the new one
    files.pop(run / "state.pt")
    with read_only(run / "samples"):
        proc = gesso_cli(*second_epoch(run, cache))
    assert_one_line_error(proc, run / "samples" / "demo-e000002-00.png", "read-only")
    assert_nothing_lost(run, files, rows)
    loadable(run / "demo-000002.safetensors")
    assert torch.load(run / "state.pt", weights_only=True)["epoch"] == 3  # --resume goes on after epoch 2


@pytest.mark.slow
@pytest.mark.parametrize("output", ["a_file", "a_file/run"])  # the output folder is a file; its parent is a file
def test_an_output_path_that_is_a_file_is_one_line_naming_it(tmp_path, cache, output):
    (tmp_path / "a_file").write_text("my notes")
    args = sets(*SMALL, "train.epochs=1", f"dataset.cache_dir='{cache}'")
    proc = gesso_cli("train", DEMO, "--output-dir", tmp_path / output, *args)
    assert_one_line_error(proc, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "my notes"


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_is_a_warning_and_the_run_goes_on(tmp_path, cache, first_epoch):
    shutil.copytree(cache, tmp_path / "cache")
    before = snapshot(tmp_path / "cache")
    with read_only(tmp_path / "cache"):
        # 128 px: every latent is a miss, encoded and not writable
        proc = gesso_cli("train", DEMO, "--output-dir", tmp_path / "run",
                         *sets(*SMALL, "train.epochs=1", "dataset.resolution=128", f"dataset.cache_dir='{tmp_path / 'cache'}'"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len([line for line in proc.stderr.splitlines() if "cannot write the cache" in line]) == 1
    loadable(tmp_path / "run" / "demo.safetensors")
    assert_unchanged(before)
    assert snapshot(tmp_path / "cache").keys() == before.keys()


@pytest.mark.slow
def test_a_file_in_the_way_of_tensorboard_is_a_warning_and_metrics_has_every_step(tmp_path, cache):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").write_text("not a folder")
    proc = gesso_cli("train", DEMO, "--output-dir", run, *sets(*SMALL, "train.epochs=1", "output.tensorboard=true",
                                                                "sample.prompts=[]", f"dataset.cache_dir='{cache}'"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("tensorboard: cannot write")] != []
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "tensorboard").read_text() == "not a folder"


def stop_at(step: int):
    def on_event(event: dict) -> None:
        if event["event"] == "step" and event["step"] == step:
            raise StopTraining

    return on_event


@pytest.mark.slow
def test_a_metrics_file_cut_by_a_kill_is_repaired_on_resume(tmp_path, cache):
    cfg = load_config(DEMO, [*SMALL, "train.epochs=2", "sample.prompts=[]", f"dataset.cache_dir='{cache}'"])
    run = tmp_path / "run"
    assert train(cfg, run, on_event=stop_at(2), progress=False).stopped_early  # state.pt at step 2
    rows = (run / "metrics.jsonl").read_bytes()
    assert [json.loads(line)["step"] for line in rows.splitlines()] == [1, 2]
    # a kill -9 after step 3's row and in the middle of step 4's: step 3 is past the state, step 4 is cut
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(rows.splitlines()[-1].replace(b'"step": 2', b'"step": 3') + b'\n{"step": 4, "epoch": 2, "lo')
    train(cfg, run, resume=run, progress=False)
    metrics = (run / "metrics.jsonl").read_bytes()
    assert metrics.startswith(rows)
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_under_metrics_is_an_output_error_and_its_rows_stay(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        run = disk / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_bytes(b"".join(b'{"step": %d, "loss": 1.0}\n' % s for s in (1, 2)))
        before = snapshot(run)
        leave_free(disk, 0)
        with pytest.raises(OutputError, match="metrics.jsonl: no space left"):  # resuming rewrites it: atomically
            RunLog(run, 2, False).open()  # a run opens its log once it is proved (engine/run/rundir.py)
        assert_unchanged(before)
        assert temp_litter(run) == []

        log = RunLog(run, 0, False)
        log.open()  # a new run: an empty file, the old one's page freed
        with pytest.raises(OutputError, match="metrics.jsonl: no space left"):
            for step in range(1, 1000):  # 4 KiB of rows fill the page; the next one fails
                log.step({"step": step, "epoch": 1, "loss": 0.5, "lr": 1e-4}, 1.0, None)
        log.close()  # no second error for the row that failed
        complete = (run / "metrics.jsonl").read_bytes().rsplit(b"\n", 1)[0].splitlines()
        assert [json.loads(line)["step"] for line in complete] == list(range(1, len(complete) + 1)) and len(complete) > 10


def test_a_full_disk_under_tensorboard_is_one_warning_not_a_hang(tmp_path, caplog):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        board = Board(disk / "tensorboard", 0)
        leave_free(disk, 0)
        with caplog.at_level(logging.WARNING, logger="gesso.logs"):
            for step in range(1, 1000):  # tensorboardX's own writer thread would die here and block the loop
                board.add(step, {"loss": 0.5, "lr": 1e-4})
            board.close()
        assert board.writer is None
        warnings = [r.getMessage() for r in caplog.records if r.name == "gesso.logs"]
        assert len(warnings) == 1 and warnings[0].startswith(f"tensorboard: cannot write in {disk / 'tensorboard'}")


def test_each_writer_on_a_full_disk_is_an_output_error_and_the_earlier_file_stays(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        tensors = {"x": torch.randn(64, 64)}
        noise = lambda side: Image.fromarray(torch.randint(0, 255, (side, side, 3), dtype=torch.uint8).numpy())
        writers = {  # the three ways files reach write_atomic: bytes, safetensors by path (Rust), PIL
            "a.bin": lambda p, big: write_bytes_atomic(p, bytes(big * 2**20 + 1)),
            "b.safetensors": lambda p, big: write_atomic(p, lambda tmp: save_file({"x": torch.randn(big * 2**18 + 1)}, tmp)),
            "c.png": lambda p, big: save_png(noise(64 + big * 600), p, "a prompt"),  # incompressible
        }
        for name, write in writers.items():
            write(disk / name, 0)
        save_file(tensors, disk / "d.safetensors")
        before = snapshot(disk)
        leave_free(disk, 64 * 1024)
        for name, write in writers.items():
            with pytest.raises(OutputError, match=re.escape(f"{disk / name}: no space left")):
                write(disk / name, 1)
        assert_unchanged(before)
        assert temp_litter(disk) == []


def test_ctrl_c_in_a_write_propagates_and_leaves_the_earlier_file(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"earlier")

    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.bin", interrupted)
    assert (tmp_path / "a.bin").read_bytes() == b"earlier" and temp_litter(tmp_path) == []


@pytest.mark.parametrize("target, named, what", [
    ("folder/a.bin", "folder/a.bin", "a folder of that name is in the way"),  # the file's name is a folder
    ("file/a.bin", "file", "is a file, not a folder"),  # its folder is a file
    ("file/sub/a.bin", "file", "is a file, not a folder"),  # a folder above it is a file
])
def test_a_path_in_the_way_is_one_line_naming_it(tmp_path, target, named, what):
    (tmp_path / "folder" / "a.bin").mkdir(parents=True)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(OutputError) as e:
        write_bytes_atomic(tmp_path / target, b"data")
    assert str(tmp_path / named) in str(e.value) and what in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "file").read_text() == "in the way" and temp_litter(tmp_path) == []


def test_a_read_only_folder_is_an_output_error(tmp_path):
    write_bytes_atomic(tmp_path / "ro" / "a.bin", b"earlier")
    with read_only(tmp_path / "ro"):
        with pytest.raises(OutputError, match="read-only") as e:
            write_bytes_atomic(tmp_path / "ro" / "a.bin", b"new")
        assert e.value.__cause__.errno == errno.EROFS
    assert (tmp_path / "ro" / "a.bin").read_bytes() == b"earlier" and temp_litter(tmp_path) == []

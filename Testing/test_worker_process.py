"""The out-of-process runner, driven with real subprocesses (and the real CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.worker_process import (WorkerProcess, kill_process_tree, python_executable, worker_command,
                                         worker_environment)

HAS_PROC = Path("/proc/self/stat").exists()


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_progress_log_and_result_are_dispatched_in_order(tmp_path):
    script = _script(tmp_path, "emit.py", """
        import json, sys
        for done in range(1, 4):
            print(json.dumps({"progress": {"stage": "calibrate", "done": done, "total": 3}}), flush=True)
        print("a plain log line")
        print("{not json")
        print("warming up", file=sys.stderr)
        print(json.dumps({"result": {"labels": "out.nrrd", "timings": {"total_s": 1.5}}}), flush=True)
    """)
    progress, logs = [], []
    worker = WorkerProcess([sys.executable, str(script)], on_progress=lambda *step: progress.append(step),
                           on_log=logs.append)
    result = worker.start().wait(timeout=60)
    assert result == {"labels": "out.nrrd", "timings": {"total_s": 1.5}}
    assert progress == [("calibrate", 1, 3), ("calibrate", 2, 3), ("calibrate", 3, 3)]
    assert "a plain log line" in logs and "{not json" in logs and "warming up" in logs
    assert worker.error is None and worker.finished and not worker.running


def test_error_line_becomes_ptqerror_and_job_files_are_removed(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "input.nrrd").write_bytes(b"partial")
    script = _script(tmp_path, "fail.py", """
        import json, sys
        print(json.dumps({"error": "Model not found: x.onnx. Check the path."}), flush=True)
        sys.exit(1)
    """)
    worker = WorkerProcess([sys.executable, str(script)], cleanup=[job_dir])
    with pytest.raises(PTQError, match="Model not found: x.onnx"):
        worker.start().wait(timeout=60)
    assert not job_dir.exists()


def test_crash_without_error_line_reports_exit_code_and_last_output(tmp_path):
    script = _script(tmp_path, "crash.py", """
        print("loading model")
        raise RuntimeError("segfault-like failure")
    """)
    worker = WorkerProcess([sys.executable, str(script)])
    with pytest.raises(PTQError, match="exit code 1") as raised:
        worker.start().wait(timeout=60)
    assert "segfault-like failure" in str(raised.value)


def test_clean_exit_without_result_is_an_error(tmp_path):
    script = _script(tmp_path, "silent.py", "print('nothing to report')\n")
    with pytest.raises(PTQError, match="without reporting a result"):
        WorkerProcess([sys.executable, str(script)]).start().wait(timeout=60)


@pytest.mark.skipif(not HAS_PROC or os.name == "nt", reason="checks process states through Linux /proc")
def test_cancel_kills_the_whole_tree_and_leaves_no_partial_files(tmp_path):
    """The worker starts a grandchild (as PythonSlicer starts the real Python) and writes a partial file."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    pids_file = tmp_path / "pids.txt"
    script = _script(tmp_path, "slow.py", f"""
        import json, os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pids_file)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        open({str(job_dir / 'labels.nrrd.tmp')!r}, "wb").write(b"half written")
        print(json.dumps({{"progress": {{"stage": "sliding window", "done": 1, "total": 100}}}}), flush=True)
        time.sleep(300)
    """)
    progress = []
    worker = WorkerProcess([sys.executable, str(script)], on_progress=lambda *step: progress.append(step),
                           cleanup=[job_dir]).start()
    deadline = time.monotonic() + 60
    while not progress and time.monotonic() < deadline:
        worker.poll()
        time.sleep(0.05)
    assert progress, "the worker never reported progress"
    worker_pid, grandchild_pid = map(int, pids_file.read_text().split())
    assert _alive(worker_pid) and _alive(grandchild_pid)
    started = time.monotonic()
    worker.cancel()
    assert time.monotonic() - started < 10
    assert worker.cancelled and worker.finished and worker.error == "Cancelled."
    deadline = time.monotonic() + 5
    while _alive(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker_pid)
    assert not _alive(grandchild_pid), "cancel left the grandchild running"
    assert not job_dir.exists(), "cancel left partial files"
    assert worker.poll() is True


def test_wait_timeout_stops_the_worker(tmp_path):
    script = _script(tmp_path, "sleep.py", "import time; time.sleep(300)\n")
    worker = WorkerProcess([sys.executable, str(script)])
    with pytest.raises(PTQError, match="longer than 1 s"):
        worker.start().wait(timeout=1)
    assert worker.process.returncode is not None


def test_injected_launcher_starts_a_new_session(tmp_path):
    """Tests and host applications can launch the process their way; the runner asks for its own group."""
    calls = []

    def launcher(command, **kwargs):
        calls.append(kwargs)
        return subprocess.Popen(command, **kwargs)

    script = _script(tmp_path, "ok.py", "import json; print(json.dumps({'result': {'ok': True}}))\n")
    assert WorkerProcess([sys.executable, str(script)], launcher=launcher).start().wait(timeout=60) == {"ok": True}
    expected = "creationflags" if os.name == "nt" else "start_new_session"
    assert calls and calls[0].get(expected)


def test_launch_failure_is_a_ptqerror(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    worker = WorkerProcess([str(tmp_path / "no-such-python")], cleanup=[job_dir])
    with pytest.raises(PTQError, match="Cannot start the worker"):
        worker.start()
    assert not job_dir.exists()


def test_kill_process_tree_on_an_already_finished_process():
    process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    process.wait()
    kill_process_tree(process)
    assert process.returncode == 0


def test_real_cli_worker_reports_its_error_as_json(tmp_path):
    """The real ``slicer-ptq`` worker: a missing model comes back as the CLI's own message."""
    pytest.importorskip("SlicerPTQLib.cli")
    volume = tmp_path / "missing.nii.gz"
    command = worker_command(["segment", str(tmp_path / "missing.onnx"), str(volume), "--out",
                              str(tmp_path / "labels.nrrd")])
    assert command[:4] == [python_executable(), "-m", "SlicerPTQLib.cli", "--progress-json"]
    worker = WorkerProcess(command, env=worker_environment())
    with pytest.raises(PTQError) as raised:
        worker.start().wait(timeout=300)
    assert "missing.onnx" in str(raised.value)
    assert worker.process.returncode == 1
    assert not (tmp_path / "labels.nrrd").exists()


def test_worker_environment_puts_the_package_first_on_the_path():
    env = worker_environment()
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(first) / "SlicerPTQLib" / "worker_process.py").is_file()
    assert env["PYTHONUNBUFFERED"] == "1"


def test_windows_workers_and_taskkill_start_without_a_console_window(monkeypatch):
    """As slicer.util.launchConsoleProcess: CREATE_NO_WINDOW, so no console shows up that a user could close."""
    from SlicerPTQLib import worker_process

    calls = []

    def launcher(command, **kwargs):
        calls.append(kwargs)
        raise OSError("recorded, not started")

    monkeypatch.setattr(worker_process.os, "name", "nt")
    assert worker_process.no_console_window() == {"creationflags": 0x08000000}
    with pytest.raises(PTQError, match="recorded, not started"):
        WorkerProcess(["PythonSlicer", "-m", "SlicerPTQLib.cli"], launcher=launcher).start()
    assert calls[0]["creationflags"] == 0x08000000 | 0x00000200  # no window, own process group
    assert "start_new_session" not in calls[0]

    class Exited:
        pid = 4321

        def wait(self):
            return 0

    ran = []
    monkeypatch.setattr(worker_process.subprocess, "run", lambda command, **kwargs: ran.append((command, kwargs)))
    kill_process_tree(Exited())
    assert ran[0][0][:4] == ["taskkill", "/F", "/T", "/PID"] and ran[0][1]["creationflags"] == 0x08000000

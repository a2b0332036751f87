"""Run the heavy work in a separate process and follow its JSON-lines report.

The Slicer module never quantizes or segments in its own process: it
launches ``PythonSlicer -m SlicerPTQLib.cli --progress-json ...``, reads
``{"progress": ...}``, ``{"result": ...}`` and ``{"error": ...}`` lines from
the worker's stdout in a background thread, and hands them to callbacks in
the caller's thread when it calls :meth:`WorkerProcess.poll` (from a
``QTimer`` in the GUI, in a loop in :meth:`WorkerProcess.wait`). Cancel kills
the whole process tree (``PythonSlicer`` is a launcher; killing it alone
would leave the real worker running) and removes the job's files.

A worker never outlives the process driving it, even one killed with
SIGKILL: it holds the write end of the worker's stdin and passes its pid,
and the worker exits when its stdin reaches EOF or that pid is gone
(:func:`exit_with_parent`, called by the CLI).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .atomic import process_alive
from .errors import PTQError
from .progress import ProgressCallback

#: ``launcher(command, **popen_kwargs)`` -> a ``subprocess.Popen``-like object.
Launcher = Callable[..., subprocess.Popen]
LogCallback = Callable[[str], None]

TERMINATE_GRACE_S = 3.0
_LOG_TAIL = 20
#: Set in a worker's environment: the pid of the process driving it.
PARENT_PID_ENV = "SLICER_PTQ_PARENT_PID"
PARENT_POLL_S = 1.0


#: Windows process creation flags (constants of ``subprocess`` there, spelled out to be usable everywhere).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def no_console_window() -> Dict[str, int]:
    """``subprocess`` keyword arguments that start a console program without a console window on Windows
    (as ``slicer.util.launchConsoleProcess`` does): no window flashes up, and none a user could close
    (which would kill the program)."""
    return {"creationflags": CREATE_NO_WINDOW} if os.name == "nt" else {}


def python_executable() -> str:
    """``PythonSlicer`` inside 3D Slicer (it sets up Slicer's Python environment), else this Python."""
    here = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        if (here / name).is_file():
            return str(here / name)
    return shutil.which("PythonSlicer") or sys.executable


def worker_command(arguments: Sequence[str], module: str = "SlicerPTQLib.cli") -> List[str]:
    """The command running ``slicer-ptq --progress-json <arguments>`` out of process (or another
    ``module`` speaking its JSON lines, e.g. ``SlicerPTQLib.fetch_worker``)."""
    options = ["--progress-json"] if module == "SlicerPTQLib.cli" else []
    return [python_executable(), "-m", module, *options, *[str(a) for a in arguments]]


def worker_environment() -> Dict[str, str]:
    """This environment with the folder holding ``SlicerPTQLib`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in [env.get("PYTHONPATH", "")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProcess:
    """One worker command running out of process, reported through JSON lines.

    ``cleanup`` lists files/folders that belong to this job only: they are
    removed when the job is cancelled or fails, so nothing half-written is
    left behind. ``launcher`` is ``subprocess.Popen`` unless a test or a host
    application injects another.
    """

    def __init__(self, command: Sequence[str], on_progress: Optional[ProgressCallback] = None,
                 on_log: Optional[LogCallback] = None, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[Path] = None, cleanup: Sequence[Path] = (), launcher: Launcher = subprocess.Popen):
        self.command = [str(part) for part in command]
        self.on_progress = on_progress
        self.on_log = on_log
        self.env = env
        self.cwd = cwd
        self.cleanup_paths = [Path(path) for path in cleanup]
        self.launcher = launcher
        self.process: Optional[subprocess.Popen] = None
        self.result: Optional[dict] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self.finished = False
        self._events: "queue.Queue" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._log_tail: deque = deque(maxlen=_LOG_TAIL)

    def start(self) -> "WorkerProcess":
        """Launch the command; returns at once."""
        if self.process is not None:
            raise RuntimeError("WorkerProcess.start() called twice")
        platform_kwargs = ({"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW} if os.name == "nt"
                           else {"start_new_session": True})
        env = dict(self.env if self.env is not None else os.environ)
        env[PARENT_PID_ENV] = str(os.getpid())
        try:
            # stdin stays open, unused, until the job ends: its EOF tells the worker this process is gone.
            self.process = self.launcher(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, cwd=self.cwd, text=True,
                                         encoding="utf-8", errors="replace", bufsize=1, **platform_kwargs)
        except OSError as exc:
            self._remove_job_files()
            raise PTQError(f"Cannot start the worker ({self.command[0]}): {exc}. Check that 3D Slicer's "
                           "PythonSlicer (or python) is installed and executable.") from exc
        for stream, kind in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, kind), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and not self.finished

    def poll(self) -> bool:
        """Dispatch pending progress/log lines here; True once the worker has ended."""
        if self.process is None or self.finished:
            return self.finished
        self._dispatch()
        if self.process.poll() is not None and not any(reader.is_alive() for reader in self._readers):
            self._dispatch()
            self._conclude()
        return self.finished

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> dict:
        """Block until the worker ends; its result payload, or PTQError with its message."""
        if self.process is None:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise PTQError(f"The worker took longer than {timeout:.0f} s and was stopped.")
            time.sleep(interval)
        if self.error is not None:
            raise PTQError(self.error)
        return self.result or {}

    def cancel(self) -> None:
        """Kill the worker and every process it started; remove the job's files."""
        if self.process is None or self.finished:
            return
        self.cancelled = True
        kill_process_tree(self.process)
        for reader in self._readers:
            reader.join(timeout=TERMINATE_GRACE_S)
        self.finished = True
        self.error = "Cancelled."
        self._close_stdin()
        self._remove_job_files()

    def _read(self, stream, kind: str) -> None:
        for line in stream:
            line = line.rstrip("\r\n")
            if kind == "stdout" and line.startswith("{"):
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                if isinstance(message, dict) and message.keys() & {"progress", "result", "error"}:
                    self._events.put(("message", message))
                    continue
            self._events.put(("log", line))
        stream.close()

    def _dispatch(self) -> None:
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "log":
                self._log_tail.append(payload)
                if self.on_log is not None:
                    self.on_log(payload)
            elif "progress" in payload:
                step = payload["progress"]
                if self.on_progress is not None:
                    self.on_progress(str(step.get("stage", "")), int(step.get("done", 0)), int(step.get("total", 0)))
            elif "result" in payload:
                self.result = payload["result"]
            else:
                self.error = str(payload["error"])

    def _conclude(self) -> None:
        self.finished = True
        self._close_stdin()
        code = self.process.returncode
        if code != 0 and self.error is None:
            tail = "\n".join(self._log_tail) or "(no output)"
            self.error = (f"The worker stopped with exit code {code}. Its last output:\n{tail}\n"
                          "See the log for details.")
        elif code == 0 and self.result is None and self.error is None:
            self.error = "The worker ended without reporting a result. See the log for details."
        if self.error is not None:
            self._remove_job_files()

    def _close_stdin(self) -> None:
        stream = getattr(self.process, "stdin", None)
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # the worker is gone already

    def _remove_job_files(self) -> None:
        for path in self.cleanup_paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def kill_process_tree(process: subprocess.Popen) -> None:
    """Terminate ``process`` and its descendants (started in their own session/group)."""
    if os.name == "nt":
        # taskkill ships with Windows and walks the child tree (/T).
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False,
                       **no_console_window())
    else:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        # Descendants may outlive the leader or ignore SIGTERM: finish the group.
        _signal_group(process.pid, signal.SIGKILL)
        if process.poll() is None:  # a launcher that did not start a new session
            process.kill()
    process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def exit_with_parent() -> None:
    """In a worker (``$SLICER_PTQ_PARENT_PID`` set): end this process as soon as its driver is gone.

    Two watchers, daemon threads: EOF on stdin when it is a pipe (the driver
    holds its write end, which the kernel closes however the driver dies)
    and the driver's pid, for launchers that do not pass stdin on. The
    variable is removed so the worker's own children do not inherit it.
    """
    value = os.environ.pop(PARENT_PID_ENV, None)
    if not value or not value.isdigit():
        return
    parent = int(value)

    def stdin_closed() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            return  # unreadable stdin tells nothing; the pid watcher still runs
        os._exit(1)

    def parent_gone() -> None:
        while process_alive(parent):
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    try:
        stdin_is_pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        stdin_is_pipe = False
    if stdin_is_pipe:
        threading.Thread(target=stdin_closed, name="exit-with-parent-stdin", daemon=True).start()
    if os.name != "nt":  # os.kill(pid, 0) would terminate the process on Windows
        threading.Thread(target=parent_gone, name="exit-with-parent-pid", daemon=True).start()

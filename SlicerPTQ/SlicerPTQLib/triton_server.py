"""A real Triton Inference Server on this machine, from the ``nvidia-pytriton`` wheel.

The wheel ships NVIDIA's ``tritonserver`` binary, its Python backend and
one backend stub per Python version. pytriton itself pins ``numpy<2``, so
the wheel is installed with ``--no-deps`` into its own folder
(:func:`triton_home`) and only its binaries are used; nothing of it is
imported here. :class:`TritonServer` starts the server on 127.0.0.1 with
free ports and stops it (tests, benchmarks, a local department server).

``python -m SlicerPTQLib.triton_server install`` installs it (CI does).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

from .errors import PTQError
from .fetch import cache_dir

#: The wheel the server comes from (pinned: its stub must match its server).
PACKAGE = "nvidia-pytriton==0.7.0"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def triton_home() -> Path:
    """Where the server is installed: ``$SLICER_PTQ_TRITON_HOME`` or ``<cache>/triton``."""
    env = os.environ.get("SLICER_PTQ_TRITON_HOME")
    return Path(env).expanduser() if env else cache_dir() / "triton"


def _wheel_root(home: Path) -> Path:
    return home / "site" / "pytriton" / "tritonserver"


def server_folder(home: Optional[Path] = None) -> Path:
    """The assembled server: ``bin/tritonserver`` and ``backends/python`` with this Python's stub."""
    return (home or triton_home()) / f"server-py{sys.version_info.major}.{sys.version_info.minor}"


def install(home: Optional[Path] = None, quiet: bool = True) -> Path:
    """Install (once) and assemble the server; returns :func:`server_folder`. PTQError when pip fails."""
    home = home or triton_home()
    folder = server_folder(home)
    if (folder / "bin" / "tritonserver").is_file() and (folder / "backends" / "python" /
                                                          "triton_python_backend_stub").is_file():
        return folder
    if not (_wheel_root(home) / "bin" / "tritonserver").is_file():
        home.mkdir(parents=True, exist_ok=True)
        site = Path(tempfile.mkdtemp(prefix=".site-", dir=home))
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                   "--target", str(site), PACKAGE] + (["-q"] if quiet else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(site, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise PTQError(f"Cannot install the Triton server ({PACKAGE}) into {home}: {last}. "
                           "Check the connection to PyPI, or set SLICER_PTQ_TRITON_HOME to a writable folder.")
        shutil.rmtree(home / "site", ignore_errors=True)
        os.replace(site, home / "site")
    _assemble(home, folder)
    return folder


def _assemble(home: Path, folder: Path) -> None:
    """Copy the server and this Python's backend stub into one folder, published by rename."""
    root = _wheel_root(home)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise PTQError(f"{PACKAGE} has no Python backend stub for Python {version}. "
                       "Run the server from a Python the wheel supports (3.8 to 3.13).")
    staging = Path(tempfile.mkdtemp(prefix=".server-", dir=home))
    try:
        for part in ("bin", "backends", "caches"):
            shutil.copytree(root / part, staging / part, symlinks=True)
        # The Python backend starts the stub it finds beside itself.
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def library_path(home: Optional[Path] = None) -> str:
    """``LD_LIBRARY_PATH`` for the server: the wheel's bundled libraries and this Python's libpython.

    The stub is linked against ``libpython3.X.so``; this interpreter's own
    library comes first so the stub runs this Python and its packages.
    """
    home = home or triton_home()
    parts = [sysconfig.get_config_var("LIBDIR") or "", str(home / "site" / "nvidia_pytriton.libs")]
    if os.environ.get("LD_LIBRARY_PATH"):
        parts.append(os.environ["LD_LIBRARY_PATH"])
    return os.pathsep.join(part for part in parts if part)


def unavailable_reason(home: Optional[Path] = None) -> str:
    """Why the installed server cannot run here ("" when it can)."""
    if not sys.platform.startswith("linux"):
        return "the Triton server wheel runs on Linux only"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return f"this Python ({sys.executable}) has no shared libpython, which the Python backend stub needs"
    folder = server_folder(home)
    binary = folder / "bin" / "tritonserver"
    if not binary.is_file():
        return f"the server is not installed in {folder} (python -m SlicerPTQLib.triton_server install)"
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(home))
    for executable in (binary, folder / "backends" / "python" / "triton_python_backend_stub"):
        try:
            linked = subprocess.run(["ldd", str(executable)], capture_output=True, text=True, env=env).stdout
        except OSError as exc:
            return f"cannot check the libraries of {executable.name}: {exc}"
        missing = [line.split()[0] for line in linked.splitlines() if "not found" in line]
        if missing:
            return f"{executable.name} misses shared libraries: {', '.join(missing)}"
    return ""


def python_backend_reason() -> str:
    """Why a Python-backend model would not see this environment's packages ("" when it would).

    The backend stub embeds libpython, which finds the interpreter's own
    site-packages and ignores PYTHONPATH; a virtual environment's packages
    stay invisible to it.
    """
    if sys.prefix != sys.base_prefix:
        return (f"the Python backend stub runs the base interpreter ({sys.base_prefix}), not this virtual "
                f"environment ({sys.prefix}), so its model would not find this environment's packages")
    return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TritonServer:
    """``tritonserver`` over a model repository on 127.0.0.1, as a context manager.

    ``with TritonServer(repo) as server: server.url`` -> ``http://127.0.0.1:<port>``, and
    ``server.grpc_url`` -> ``grpc://127.0.0.1:<port>`` (both protocols are served).
    ``models``: load only these (explicit model control); by default every
    model of the repository loads. The server's log goes to ``log_path``
    (a temporary file by default).
    """

    def __init__(self, repository: Path, models: Optional[List[str]] = None, home: Optional[Path] = None,
                 http_port: Optional[int] = None, grpc_port: Optional[int] = None, log_path: Optional[Path] = None,
                 extra_args: Optional[List[str]] = None):
        self.repository = Path(repository)
        self.models = list(models or [])
        self.home = home or triton_home()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or next(port for port in iter(free_port, None) if port != self.http_port)
        self._own_log = log_path is None  # a temporary log goes when the server stops
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args or [])
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def command(self) -> List[str]:
        folder = server_folder(self.home)
        return [str(folder / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={folder / 'backends'}", "--http-address=127.0.0.1",
                f"--http-port={self.http_port}", "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false",
                "--exit-timeout-secs=5", *self._model_args(), *self.extra_args]

    def _model_args(self) -> List[str]:
        if not self.models:
            return []
        return ["--model-control-mode=explicit", *(f"--load-model={name}" for name in self.models)]

    def environment(self) -> Dict[str, str]:
        return dict(os.environ, LD_LIBRARY_PATH=library_path(self.home))

    def start(self, timeout: float = READY_TIMEOUT_S) -> "TritonServer":
        """Start the server and wait until it and all its models are ready; PTQError if they are not."""
        reason = unavailable_reason(self.home)
        if reason:
            raise PTQError(f"The Triton server cannot run here: {reason}.")
        with open(self.log_path, "wb") as log:
            # A session of its own, so stop() can end the backend stubs with the server.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise PTQError(f"The Triton server exited with code {self.process.returncode} while starting: "
                               f"{tail}")
            if self._ready():
                return self
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise PTQError(f"The Triton server was not ready within {timeout:.0f} s: {tail}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """End the server at once (SIGKILL to its session), as a crash would."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL after :data:`STOP_TIMEOUT_S`), stubs included."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stubs left behind by the server
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        errors = [line for line in text.splitlines() if line.startswith("E") or "rror" in line]
        return " | ".join((errors or text.splitlines())[-lines:]) or "(empty log)"

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    """``install``: install the server; ``check``: say whether it can run here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv[0] if argv else "check"
    try:
        if action == "install":
            print(f"Triton server in {install(quiet=False)}")
        reason = unavailable_reason()
    except PTQError as exc:
        reason = str(exc)
    print(f"Triton server: {reason or 'can run here'}")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())

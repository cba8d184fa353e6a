"""A bubblewrap sandbox for untrusted code: no network, no view of the host's files, no new
processes, limits on CPU, memory, open files and output, and a private writable `/mnt/data`.

What the sandboxed program sees (everything else of the host does not exist for it):
  /usr and the interpreter's own prefix, read-only; a fresh /proc of its own PID namespace; a
  minimal /dev; /tmp and /mnt/data as size-capped tmpfs (the only writable places: the root is
  remounted read-only); no environment but what we set.
Namespaces: user (uid 65534 inside, no further user namespaces), PID, network (empty: not even
127.0.0.1 reaches the host), IPC, UTS, mount, cgroup. `--die-with-parent`, `--new-session`, all
capabilities dropped, and the seccomp filter of `seccomp.py`.

`probe()` checks at start that all of it works here; where it does not, the tool is refused with
the reason (never run unsandboxed).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache

from inhouse.errors import ConfigError, InhouseError
from inhouse.tools.seccomp import bpf_fd, filter_bpf


class SandboxUnavailable(InhouseError):
    """Isolation cannot be set up on this machine; the tool must not run."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 120.0  # one execution; past it the session is killed
    cpu_seconds: int = 600  # the whole session (RLIMIT_CPU)
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    output_bytes: int = 64 << 10  # what one execution may print (the rest is cut)
    data_bytes: int = 256 << 20  # /mnt/data
    tmp_bytes: int = 64 << 20  # /tmp (the captured output lives here too)
    open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "output_bytes", "data_bytes",
                     "tmp_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"sandbox limit '{name}' must be positive")
        if self.memory_bytes < 64 << 20:
            raise ConfigError("sandbox limit 'memory_bytes' must be at least 64 MiB "
                              "(the interpreter alone needs that much address space)")


def interpreter() -> tuple[str, str]:
    """(executable, prefix) of the Python that runs sandboxed code: this one's base interpreter,
    stdlib only (`-I -S`), so that nothing of the server's environment is importable."""
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.join(prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    if not os.path.exists(exe):
        exe = os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
    return exe, prefix


def bwrap_args(limits: SandboxLimits, seccomp_fd: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("the python tool needs bubblewrap ('bwrap'), which is not "
                                 "installed: apt-get install bubblewrap")
    exe, prefix = interpreter()
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534",
            "--gid", "65534", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv", "--setenv", "HOME", "/mnt/data", "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):  # merged /usr: the top-level links
        if os.path.islink(f"/{link}"):
            args += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    if not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
             "--dir", "/mnt", "--size", str(limits.data_bytes), "--perms", "0700",
             "--tmpfs", "/mnt/data", "--remount-ro", "/", "--chdir", "/mnt/data",
             "--seccomp", str(seccomp_fd), exe, "-I", "-S", "-u"]
    return args


def _apply_limits(limits: SandboxLimits) -> None:  # in the child, before exec (inherited)
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    size = max(limits.data_bytes, limits.tmp_bytes)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def spawn(argv_tail: list[str], limits: SandboxLimits) -> subprocess.Popen:
    """Start `python -I -S -u ARGV_TAIL...` in the sandbox, pipes on stdin/stdout/stderr."""
    program = _bpf()
    fd = bpf_fd(program)
    try:
        return subprocess.Popen(
            bwrap_args(limits, fd) + argv_tail, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, pass_fds=(fd,), env={"PATH": "/usr/bin:/bin"},
            preexec_fn=lambda: _apply_limits(limits), start_new_session=True, cwd="/")
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def _bpf() -> bytes:
    try:
        return filter_bpf()
    except (ImportError, OSError, RuntimeError) as e:
        raise SandboxUnavailable(f"the python tool needs libseccomp (pyseccomp): {e}") from None


_PROBE = ("import socket, os\n"
          "s = socket.socket(socket.AF_UNIX)\n"
          "try:\n    socket.socket(socket.AF_INET); print('inet')\nexcept OSError: pass\n"
          "try:\n    os.fork(); print('fork')\nexcept OSError: pass\n"
          "print('ok', os.getuid(), os.path.exists('/etc'))\n")


@lru_cache(maxsize=1)
def probe() -> None:
    """Raise `SandboxUnavailable` unless a sandboxed interpreter starts here and is contained
    (no AF_INET socket, no fork). Cached: checked once per process."""
    try:
        p = spawn(["-c", _PROBE], SandboxLimits())
        out, err = p.communicate(timeout=30)
    except SandboxUnavailable:
        raise
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"the python sandbox could not start: {e}") from None
    text = out.decode(errors="replace").strip()
    if p.returncode != 0 or text != "ok 65534 False":
        why = (err.decode(errors="replace").strip().splitlines() or [text or "no output"])[-1]
        raise SandboxUnavailable(f"the python sandbox is not available on this machine "
                                 f"(bubblewrap said: {why[:300]})")

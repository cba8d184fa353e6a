"""The python tool's sandbox, tried by someone who wants out: every escape must be contained, and
the server (this process) must come through every attempt unharmed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from inhouse.tools import sandbox
from inhouse.tools.python import PythonSession, PythonSessions, SessionNotFound
from inhouse.tools.sandbox import SandboxLimits, SandboxUnavailable


@pytest.fixture(scope="module")
def session():
    sandbox.probe()  # no bubblewrap here is a failure, not a skip: `make test` installs it
    s = PythonSession(SandboxLimits(wall_seconds=5, memory_bytes=256 << 20, output_bytes=4096,
                                    data_bytes=8 << 20, cpu_seconds=60))
    yield s
    s.close()


def run(session, code):
    return session.run(code)


def test_state_persists_between_calls(session):
    assert not run(session, "import math\nx = 20").error
    r = run(session, "x * 2 + 2")
    assert (r.output, r.error) == ("42\n", False)
    assert "ZeroDivisionError" in run(session, "1/0").output
    assert run(session, "x").output == "20\n"  # an error in one cell keeps the namespace


def test_no_network_even_to_localhost(session):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    r = run(session, f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert r.error and "Address family not supported" in r.output
    # a raw socket, a netlink socket, an IPv6 one: all refused by the filter
    for family in ("AF_INET6", "AF_NETLINK", "AF_PACKET"):
        r = run(session, f"import socket\nsocket.socket(socket.{family})")
        assert r.error, family
    # the namespace is empty even below the filter: no interface but a loopback that is down
    r = run(session, "import os\nsorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') else []")
    assert "eth" not in r.output
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever arrived
    server.close()


def test_host_files_are_invisible(session, tmp_path):
    secret = tmp_path / "audit-signing.key"
    secret.write_text("TOP-SECRET-KEY")
    for path in (str(secret), "/etc/passwd", "/etc/shadow", "/proc/1/root/etc/passwd",
                 os.path.expanduser("~/.cache/inhouse/audit-signing.key"), "/work"):
        r = run(session, f"open({path!r}).read()")
        assert r.error and "TOP-SECRET" not in r.output, path
    r = run(session, "import os\nsorted(os.listdir('/'))")
    assert set(eval(r.output)) <= {"bin", "dev", "lib", "lib64", "mnt", "proc", "root", "sbin",
                                    "tmp", "usr"}
    # the server's environment (API keys, database URLs) is not the sandbox's
    os.environ["INHOUSE_TEST_SECRET"] = "leaked"
    try:
        fresh = PythonSession(SandboxLimits(wall_seconds=5))
        r = fresh.run("import os\nprint(dict(os.environ)); print(open('/proc/1/environ').read())")
        fresh.close()
        assert "leaked" not in r.output
    finally:
        del os.environ["INHOUSE_TEST_SECRET"]


def test_writes_only_inside_mnt_data(session, tmp_path):
    marker = f"/tmp/inhouse-sandbox-{os.getpid()}"
    for path in ("/usr/evil", "/evil", "/root/.pyenv/evil", "/proc/evil"):
        assert run(session, f"open({path!r}, 'w').write('x')").error, path
    assert not run(session, f"open({marker!r}, 'w').write('x')").error  # its own private /tmp
    assert not os.path.exists(marker)
    r = run(session, "open('/mnt/data/out.csv', 'w').write('a,b\\n')\nimport os\nos.listdir('/mnt/data')")
    assert r.output == "['out.csv']\n"
    # /mnt/data is capped: a disk bomb fills it and stops there
    r = run(session, "f = open('/mnt/data/big', 'wb')\nfor _ in range(64): f.write(b'x' * (1 << 20))")
    assert r.error and ("No space left" in r.output or "File too large" in r.output)
    run(session, "import os; os.remove('/mnt/data/big')")


def test_sessions_do_not_share_data():
    a, b = PythonSession(), PythonSession()
    try:
        assert not a.run("open('/mnt/data/mine.txt', 'w').write('a')").error
        assert b.run("import os\nos.listdir('/mnt/data')").output == "[]\n"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("code", [
    "import os\nos.fork()",
    "import subprocess\nsubprocess.run(['/bin/true'])",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
])
def test_no_new_processes(session, code):
    r = run(session, code)
    assert r.error and ("Operation not permitted" in r.output or "PermissionError" in r.output)


def test_no_shell(session):
    # system() reports a failed spawn as the shell's exit status 127; no child ever ran
    r = run(session, "import os\nos.system('echo ran > /mnt/data/ran'), os.path.exists('/mnt/data/ran')")
    assert r.output == "(32512, False)\n"


def test_thread_and_memory_bombs_are_bounded(session):
    r = run(session, "x = bytearray(1 << 30)")
    assert r.error and "MemoryError" in r.output
    r = run(session, "import threading, time\nts = []\n"
                     "for _ in range(10000):\n"
                     "    t = threading.Thread(target=time.sleep, args=(30,), daemon=True)\n"
                     "    t.start(); ts.append(t)")
    assert r.error or r.restarted  # the address space runs out long before 10,000 stacks


def test_time_bomb_restarts_the_session(session):
    assert not run(session, "kept = 1").error
    r = run(session, "while True: pass")
    assert r.timed_out and r.restarted and "timed out" in r.text()
    assert "NameError" in run(session, "kept").output  # a fresh interpreter
    assert run(session, "1 + 1").output == "2\n"


def test_killing_the_parent_harms_only_the_session(session):
    for code in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                 "import os, signal\nos.kill(-1, signal.SIGKILL)",
                 "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
                 "import os\nos.close(3); os.close(4); print('x')"):
        run(session, code)
        assert run(session, "6 * 7").output == "42\n"
    assert threading.main_thread().is_alive()


def test_kernel_interfaces_refused(session):
    libc = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    for call in ("libc.unshare(0x10000000)", "libc.ptrace(16, 1, 0, 0)",
                 "libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)", "libc.syscall(321, 0, 0, 0)"):
        r = run(session, libc + f"({call}, ctypes.get_errno())")
        assert r.output == "(-1, 1)\n", call  # EPERM (321: bpf)


def test_output_is_capped(session):
    r = run(session, "print('y' * 100000)\nimport os\nos.write(1, b'z' * 100000)")
    assert r.truncated and len(r.output) <= 4096 and "[output truncated]" in r.text()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_text_is_a_cell_and_the_session_survives(session, code):
    r = run(session, code)
    assert isinstance(r.output, str)
    assert run(session, "'alive'").output == "'alive'\n"


def test_no_bubblewrap_means_no_tool(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        sandbox.spawn(["-c", "pass"], SandboxLimits())
    sandbox.probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable):
            PythonSessions()
        from inhouse.cli.app import app
        r = CliRunner().invoke(app, ["tools", "python", "--code", "print(1)"])
        assert r.exit_code == 1 and "bubblewrap" in r.output and "Traceback" not in r.output
    finally:
        sandbox.probe.cache_clear()


def test_sessions_belong_to_their_tenant():
    sessions = PythonSessions(max_sessions=2)
    try:
        sid = sessions.new_id()
        assert not sessions.get(sid, "acme").run("v = 'acme data'").error
        with pytest.raises(SessionNotFound):
            sessions.get(sid, "globex")
        assert sessions.get(sid, "acme").run("v").output == "'acme data'\n"
        sessions.get(sessions.new_id(), "acme")
        sessions.get(sessions.new_id(), "acme")  # the least recently used one is closed
        assert not sessions.owns(sid, "acme")
    finally:
        sessions.close()


def test_cli_runs_code():
    from inhouse.cli.app import app

    r = CliRunner().invoke(app, ["tools", "python", "--code", "sum(range(10))"])
    assert r.exit_code == 0 and r.output.strip() == "45"
    r = CliRunner().invoke(app, ["tools", "python", "--code", "raise ValueError('no')"])
    assert r.exit_code == 1 and "ValueError: no" in r.output


def _python_in_a_process(prelude: str) -> subprocess.CompletedProcess:
    """A fresh process that runs `prelude`, then one python tool call printing 6 * 7."""
    code = (prelude + "from inhouse.tools.python import PythonSession\n"
            "from inhouse.tools.sandbox import SandboxLimits\n"
            "print(PythonSession(SandboxLimits(wall_seconds=20)).run('print(6 * 7)').output, end='')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_server_started_with_stdin_closed_still_runs_python():
    """Found in the full suite (a test left fd 0 closed): the seccomp program's pipe took fd 0,
    the child's stdin replaced it, and bwrap read the request as its filter. A server started
    with `<&-` (some supervisors do) would have had no python at all."""
    r = _python_in_a_process("import os; os.close(0)\n")
    assert r.stdout == "42\n", r.stderr[-2000:]


def test_python_runs_in_a_process_with_more_than_1024_descriptors_open():
    """Found in the full suite: past fd 1024 select() raised, and every call read as a dead
    interpreter. A busy server (connections, database pools) gets there."""
    r = _python_in_a_process(
        "import os, resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))\n"
        "held = [os.open('/dev/null', os.O_RDONLY) for _ in range(1100)]\n")
    assert r.stdout == "42\n", r.stderr[-2000:]

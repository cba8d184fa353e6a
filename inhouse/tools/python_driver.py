"""Runs INSIDE the sandbox (stdlib only, never imported by the server): a notebook-like loop.

Frames on stdin: an 8-byte big-endian length, then JSON {"code": str, "limit": int}. Each cell
runs in one persistent namespace; the value of a final expression is shown, as in a notebook.
Whatever the cell writes to file descriptors 1 and 2 (print, os.write, a child's output) lands
in a file under /tmp, and at most `limit` bytes of it come back in the reply frame, written to a
descriptor the cell was never given (it is closed-on-exec and its number is not in sys).
"""
import ast
import json
import os
import signal
import struct
import sys
import traceback


def _read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    return buf


def _run(code, namespace):
    tree = ast.parse(code, "<cell>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<cell>", "exec"), namespace)
    if last is not None:
        value = eval(compile(last, "<cell>", "eval"), namespace)
        if value is not None:
            print(repr(value))


def main():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full /tmp is EFBIG, not death
    reply = os.dup(1)
    os.set_inheritable(reply, False)
    out_path = "/tmp/.cell-output"
    namespace = {"__name__": "__main__"}
    while True:
        (size,) = struct.unpack(">Q", _read_exact(8))
        request = json.loads(_read_exact(size))
        fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        failed = False
        try:
            _run(request["code"], namespace)
        except SystemExit:
            pass
        except BaseException:  # the cell's own error, shown as a notebook shows it
            failed = True
            etype, value, tb = sys.exc_info()
            while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
                tb = tb.tb_next  # the driver's own frames are not the cell's business
            traceback.print_exception(etype, value, tb)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
        limit = int(request["limit"])
        with open(out_path, "rb") as f:
            data = f.read(limit + 1)
        body = json.dumps({"output": data[:limit].decode("utf-8", "replace"),
                           "truncated": len(data) > limit, "error": failed}).encode()
        frame = memoryview(struct.pack(">Q", len(body)) + body)
        while frame:
            frame = frame[os.write(reply, frame):]


main()

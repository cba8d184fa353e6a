"""The system-call filter of the python sandbox, compiled by libseccomp (through `pyseccomp`) to
the BPF program bubblewrap loads (`bwrap --seccomp FD`) just before it runs the interpreter.

A deny list over a default of "allow", as Docker's and Flatpak's profiles are: the namespaces do
the isolating, this closes the kernel interfaces a sandboxed program has no business with.
NOTE: new processes are refused (fork, vfork, clone without CLONE_THREAD; clone3 answers ENOSYS
so that glibc's pthread_create falls back to clone): the interpreter may start threads, bounded
by the memory limit, but never a second process. This is the process limit, and it holds where
RLIMIT_NPROC cannot (a server running as root, or whose own threads share the uid's count).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile

CLONE_THREAD = 0x00010000

# the kernel's own interfaces: tracing, keys, mounts, modules, namespaces, clocks, io_uring, BPF
DENIED = (
    "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "perf_event_open",
    "bpf", "userfaultfd", "keyctl", "add_key", "request_key", "mount", "umount2", "pivot_root",
    "chroot", "unshare", "setns", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl",
    "syslog", "name_to_handle_at", "open_by_handle_at", "lookup_dcookie", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "pidfd_getfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "fanotify_init", "mount_setattr",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "personality",
    "uselib", "ioperm", "iopl", "create_module", "get_kernel_syms", "query_module", "nfsservctl",
)


def filter_bpf() -> bytes:
    """The compiled filter for this machine's architecture."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):  # not a system call on this architecture
            pass
    f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))  # a process, not a thread
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # sockets: only AF_UNIX (the network namespace is empty anyway; this is the second wall)
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX, 0))
    f.add_rule(deny, "ioctl", sc.Arg(1, sc.EQ, 0x5412, 0))  # TIOCSTI: typing into a terminal
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def bpf_fd(program: bytes) -> int:
    """A readable descriptor holding the program (bwrap reads it to the end); the caller closes
    it once the sandbox has started."""
    r, w = os.pipe()
    if len(program) > 65536:  # a pipe's buffer; filters are a few KiB
        raise ValueError("seccomp program too large for a pipe")
    os.write(w, program)
    os.close(w)
    if r < 3:  # a server started with stdin closed: this pipe got fd 0, which the child's stdin
        # then replaces, and bwrap would read our request as its seccomp program
        moved = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(r)
        r = moved
    return r

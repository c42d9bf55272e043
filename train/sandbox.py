"""Run an untrusted Python program (a generated solution plus its tests) in a separate, limited process.

`run_python(program)` writes the program to a fresh temporary folder, runs it there in a new
interpreter (`-I -S -B`: no environment variables, no site-packages, no bytecode writes) in its own
session and process group, and returns a `SandboxResult` (status, reason, capped output, times). The
folder is removed afterwards. Layers, applied by a small bootstrap in the child before the program
runs:

- a new network namespace (`unshare(CLONE_NEWNET)`, only a loopback that is down) where the process may
  create one (root, or unprivileged user namespaces); `result.network` says whether it did;
- resource limits: address space (memory), CPU seconds, size of written files, open files, no core
  dumps, and optionally the number of processes;
- an audit hook (PEP 578) that refuses, with PermissionError: creating processes (fork, exec, spawn,
  system, subprocess), changing resource limits, ctypes (which could undo everything else), sockets
  (other than local socket pairs), signals to other processes, writing, creating, removing, renaming or
  changing the mode, owner or times of anything outside the folder, symlinks, opening devices other than
  null/zero/full/random/urandom, and descriptors of directories outside the folder (a `dir_fd` base the
  `open` event would not show). Reading files anywhere stays allowed, so imports work;
- the few functions that raise no audit event and could do harm (os.mknod, os.mkfifo,
  signal.pidfd_send_signal, _posixsubprocess.fork_exec) are replaced by ones that refuse.

The parent enforces the wall-clock limit, kills the whole process group when it ends (so nothing the
program started outlives it), reads stdout and stderr incrementally (keeping the first and the last
`max_output_bytes` respectively, so a program printing gigabytes costs the parent nothing), and reads a
report the bootstrap writes on a private pipe: which network isolation held, whether the program ran to
its end, and why not.

Honest limits: this is a process sandbox, not a virtual machine or a container. It guards against the
accidents of generated code (infinite loops, fork bombs, memory hogs, stray file writes, network calls),
not against an adversary: Python code that knows the bootstrap can monkeypatch the modules the audit hook
uses, find the replaced functions again, or race a symlink between the check and the open; native code
(an extension module on sys.path) runs unchecked. Machines and CI here run as root, where RLIMIT_NPROC
does not apply and the kernel's file permissions stop nothing, so for process creation and file writes
the audit hook is the only guard. Without a network namespace, a process that got past the hook could
reach the network. Reading is not restricted (as root: every file). RLIMIT_AS counts address space, not
resident memory: threads reserve stacks and malloc arenas, so a threaded program reaches the limit
sooner. Run evaluations as an unprivileged user, or in a container, for more.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Every status a result can have.
STATUSES = ("passed", "failed", "timeout", "memory", "refused", "killed")

# The child's side, run with `python -I -S -B -c _BOOTSTRAP <json config>`. Kept free of imports from this
# package (the child sees only the standard library). Order matters: the namespace needs ctypes and the
# limits need setrlimit, both of which the audit hook refuses once installed.
_BOOTSTRAP = r'''
import json, os, sys, traceback, types
cfg = json.loads(sys.argv[1])
ROOT, PROGRAM, REPORT = cfg["root"], cfg["program"], cfg["report_fd"]


def report(**items):
    os.write(REPORT, "".join(f"{k}={' '.join(str(v).split())}\n" for k, v in items.items()).encode())


def new_network_namespace():
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0:  # CLONE_NEWNET
            return "namespace"
    except Exception:
        pass
    finally:  # a resolved ctypes function calls without audit events: the program must import afresh
        for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
            del sys.modules[name]
    return "audit hook"


report(network=new_network_namespace())

import resource
for name, value in cfg["limits"].items():  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(getattr(resource, name), (value, value + 1 if name == "RLIMIT_CPU" else value))

refusals = []


def refuse(what):
    refusals.append(what)
    raise PermissionError(f"sandbox refused {what}")


def guard():
    """Install the audit hook. Everything it calls is bound here, before the program can rebind it."""
    import _socket, stat
    realpath, fsdecode, readlink, os_stat, join = os.path.realpath, os.fsdecode, os.readlink, os.stat, os.path.join
    getpid, getpgid = os.getpid, os.getpgid
    S_ISDIR, S_ISBLK, S_ISCHR = stat.S_ISDIR, stat.S_ISBLK, stat.S_ISCHR
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    devices = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
    processes = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "subprocess.Popen"}
    # event -> (index of a path argument, index of its dir_fd argument or None), per Python 3.11's table
    paths = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
             "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
             "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
             "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3))}
    stripped = set(cfg["stripped"])

    def resolve(path, dir_fd=None):
        if isinstance(path, int):  # a descriptor: the file it is open on
            return readlink(f"/proc/self/fd/{path}")
        path = fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0:
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        return realpath(path)

    def inside(real):
        return real == ROOT or real.startswith(ROOT + "/")

    def check_open(path, mode, flags):
        if isinstance(path, int):  # wrapping an open descriptor cannot widen its access
            return
        real = resolve(path)
        try:
            st_mode = os_stat(real).st_mode
        except OSError:
            st_mode = None
        if st_mode is not None and (S_ISBLK(st_mode) or S_ISCHR(st_mode)) and real not in devices:
            refuse(f"opening the device {real}")
        writes = (flags & write_flags if isinstance(flags, int) else False) or \
            (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writes and real not in devices and not inside(real):
            refuse(f"writing {real} (outside the sandbox folder)")
        if mode is None and st_mode is not None and S_ISDIR(st_mode) and not inside(real):
            refuse(f"a descriptor of the directory {real} (outside the sandbox folder)")

    def hook(event, args):
        if event in processes:
            refuse(f"{event} (no new processes)")
        elif event.startswith("ctypes."):
            refuse(f"{event} (no ctypes)")
        elif event in ("resource.setrlimit", "resource.prlimit"):
            refuse(f"{event} (limits are fixed)")
        elif event.startswith("socket."):
            if not (event == "socket.__new__" and args[1] == _socket.AF_UNIX):  # socketpair() stays local
                refuse(f"{event} (no network)")
        elif event == "os.kill" and args[0] not in (0, getpid()) or \
                event == "os.killpg" and args[0] != getpgid(0):
            refuse(f"{event}{args} (signals to other processes)")
        elif event == "os.symlink":
            refuse("os.symlink (no symlinks)")
        elif event == "import" and args[0] in stripped:
            refuse(f"re-importing {args[0]}")
        elif event == "open":
            check_open(*args)
        elif event in paths:
            for i, d in paths[event]:
                real = resolve(args[i], None if d is None else args[d])
                if not inside(real):
                    refuse(f"{event} on {real} (outside the sandbox folder)")

    # Functions that raise no audit event in Python 3.11: replaced in the modules that hold them.
    def refusing(name):
        def refused(*args, **kwargs):
            refuse(f"{name} (raises no audit event)")
        return refused

    for module, names in cfg["stripped"].items():
        mod = __import__(module)
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, refusing(f"{module}.{name}"))
    sys.addaudithook(hook)


def finish(status, reason=""):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if status != "passed" and refusals:
        status = "refused"
        if "sandbox refused" not in reason:  # the refusal was caught, then something else failed
            reason += f" (after the sandbox refused {refusals[0]})"
    report(status=status, reason=reason)
    os._exit(0 if status == "passed" else 1)


def describe(exc):
    """'Type: message (line N: source)' for the program's innermost frame."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == PROGRAM]
    if frames:
        text += f" (line {frames[-1].lineno}: {(frames[-1].line or '')[:200]})"
    return text


with open(PROGRAM, encoding="utf-8") as f:
    source = f.read()
memory_report = f"status=memory\nreason=MemoryError (memory limit {cfg['limits']['RLIMIT_AS'] >> 20} MiB)\n".encode()
main = types.ModuleType("__main__")
main.__file__ = PROGRAM
sys.modules["__main__"], sys.argv = main, [PROGRAM]
guard()
try:
    exec(compile(source, PROGRAM, "exec"), main.__dict__)
except MemoryError:  # the program's frames may still hold the memory: write prepared bytes and leave
    os.write(REPORT, memory_report)
    os._exit(1)
except SystemExit as exc:
    finish("failed", f"exited before the end of the program (sys.exit({exc.code!r}))")
except BaseException as exc:
    try:
        traceback.print_exc()
        finish("failed", describe(exc))
    except MemoryError:
        os.write(REPORT, memory_report)
        os._exit(1)
finish("passed")
'''

# Replaced in the child: they raise no audit event (mknod as root could create device nodes).
_STRIPPED = {"os": ["mknod", "mkfifo"], "posix": ["mknod", "mkfifo"], "_signal": ["pidfd_send_signal"],
             "signal": ["pidfd_send_signal"], "_posixsubprocess": ["fork_exec"]}


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    status: passed (ran to its end without an uncaught exception) | failed (an uncaught exception, or it
    exited early: sys.exit / os._exit, whatever the code) | timeout (wall clock or CPU time) | memory
    (MemoryError under the memory limit) | refused (the sandbox refused something and the program then
    failed) | killed (a signal: e.g. the kernel's out-of-memory killer, a crash). reason: one line saying
    why (empty when passed). returncode: the process's exit status (negative: killed by that signal).
    stdout: its first max_output_bytes; stderr: its last max_output_bytes (where a traceback ends);
    truncated: either was longer. network: "namespace" (a network namespace with no interfaces up) or
    "audit hook" (only the audit hook's refusal of sockets), "unknown" if the child died before saying.
    """

    status: str
    reason: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    truncated: bool
    network: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(program: str, *, timeout_s: float = 10.0, cpu_s: float | None = None,
               memory_bytes: int = 1 << 30, max_output_bytes: int = 1 << 16, max_file_bytes: int = 1 << 24,
               max_open_files: int = 64, max_processes: int | None = None, python: str = sys.executable,
               tmp_dir: str | None = None) -> SandboxResult:
    """Run `program` (Python source) in the sandbox and say how it ended.

    timeout_s: wall-clock limit. cpu_s: CPU-time limit, whole seconds (default: timeout_s rounded up).
    memory_bytes: address-space limit. max_output_bytes: kept of each of stdout and stderr.
    max_file_bytes: largest file the program may write. max_open_files: descriptors. max_processes:
    RLIMIT_NPROC, off by default: it counts every process and thread of the user machine-wide (it would
    fail threaded programs on a busy machine), and root ignores it. python: the interpreter (standard
    library only: site-packages are not on its path). tmp_dir: where the sandbox folder is created.
    """
    for name, value in (("timeout_s", timeout_s), ("cpu_s", 1 if cpu_s is None else cpu_s),
                        ("memory_bytes", memory_bytes), ("max_output_bytes", max_output_bytes),
                        ("max_file_bytes", max_file_bytes), ("max_open_files", max_open_files)):
        if not value > 0:
            raise ValueError(f"run_python: {name} must be positive, got {value!r}")
    cpu_limit = math.ceil(timeout_s if cpu_s is None else cpu_s)
    limits = {"RLIMIT_AS": int(memory_bytes), "RLIMIT_CPU": cpu_limit, "RLIMIT_FSIZE": int(max_file_bytes),
              "RLIMIT_NOFILE": int(max_open_files), "RLIMIT_CORE": 0}
    if max_processes is not None:
        limits["RLIMIT_NPROC"] = int(max_processes)
    with tempfile.TemporaryDirectory(prefix="sandbox-", dir=tmp_dir, ignore_cleanup_errors=True) as folder:
        root = os.path.realpath(folder)
        path = os.path.join(root, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        report_r, report_w = os.pipe()
        config = {"root": root, "program": path, "report_fd": report_w, "limits": limits, "stripped": _STRIPPED}
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8"}  # no proxies, no keys
        start = time.monotonic()
        try:
            proc = subprocess.Popen([python, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(config)], cwd=root,
                                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(report_w,), start_new_session=True)
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)  # the child's copy is the only writer left
        try:
            deadline = start + timeout_s
            out, err, truncated, timed_out = _collect(proc, deadline, max_output_bytes)
            timed_out = timed_out or not _exited(proc.pid, deadline)
        finally:
            # Kill the group before reaping (also when we were interrupted): the unreaped leader keeps
            # the group id from being reused, and nothing the program left behind outlives the run.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            wall = time.monotonic() - start
            proc.stdout.close()
            proc.stderr.close()
            report = _read_report(report_r)
            os.close(report_r)
    cpu_used = usage.ru_utime + usage.ru_stime
    stderr = err.decode("utf-8", "replace")
    status, reason = _classify(proc.returncode, report, stderr, timed_out=timed_out, timeout_s=timeout_s,
                               cpu_used=cpu_used, cpu_limit=cpu_limit)
    return SandboxResult(status=status, reason=reason, returncode=proc.returncode,
                         stdout=out.decode("utf-8", "replace"), stderr=stderr, wall_s=wall, cpu_s=cpu_used,
                         truncated=truncated, network=report.get("network", "unknown"))


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close or the deadline passes. Keeps stdout's first `cap`
    bytes and stderr's last `cap` bytes, draining the rest so the child never blocks on a full pipe.
    Returns (stdout, stderr, truncated, timed_out)."""
    out, err = bytearray(), bytearray()
    truncated = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), bytes(err), truncated, True
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = key.data
                if buf is out:
                    truncated |= len(out) + len(chunk) > cap
                    out += chunk[: max(cap - len(out), 0)]
                else:
                    err += chunk
                    if len(err) > cap:
                        truncated = True
                        del err[: len(err) - cap]
    return bytes(out), bytes(err), truncated, False


def _exited(pid: int, deadline: float) -> bool:
    """Whether the child has exited by the deadline (without reaping it). Its pipes closing usually
    means it exited; a program that closes them and keeps running is caught here."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _read_report(fd: int) -> dict[str, str]:
    """The bootstrap's key=value lines. Non-blocking: a writer that somehow survived cannot hang us."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    return dict(line.split("=", 1) for line in data.decode("utf-8", "replace").splitlines() if "=" in line)


def _classify(returncode: int, report: dict[str, str], stderr: str, *, timed_out: bool, timeout_s: float,
              cpu_used: float, cpu_limit: int) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout_s:g} s"
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_used >= cpu_limit):
        return "timeout", f"CPU-time limit of {cpu_limit} s"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return "killed", f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    if report.get("status") in STATUSES:
        return report["status"], report.get("reason", "")
    # The bootstrap did not finish: the program left through os._exit (or the interpreter failed to start).
    lines = [line for line in stderr.splitlines() if line.strip()]
    if returncode == 0:
        return "failed", "exited before the end of the program (exit status 0)"
    return "failed", lines[-1].strip() if lines else f"exit status {returncode}"

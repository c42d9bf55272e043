"""train/sandbox.py: each limit and refusal on a program that needs it, offline and fast.

Programs that would harm the machine if a protection failed are bounded (the fork bomb forks six times
at most; the memory hog asks for one fixed block), so a regression fails a test instead of taking the
machine down.
"""

import os
import socket
import textwrap
import tracemalloc

import pytest

from train.sandbox import run_python


def run(program: str, **kwargs):
    kwargs.setdefault("timeout_s", 10.0)
    return run_python(textwrap.dedent(program), **kwargs)


def test_a_program_that_ends_passes():
    result = run("""
        import collections, json, math, os, re, subprocess  # imports read outside the folder: allowed
        print(json.dumps({"cwd_is_home": os.getcwd() == os.environ["HOME"]}))
    """)
    assert result.status == "passed", result
    assert result.stdout == '{"cwd_is_home": true}\n' and result.reason == "" and result.returncode == 0
    assert result.network in ("namespace", "audit hook")


def test_an_exception_fails_with_its_line_as_reason():
    result = run("""
        def f(x):
            return x + 1
        assert f(1) == 3, "f is off"
    """)
    assert result.status == "failed"
    assert result.reason == 'AssertionError: f is off (line 4: assert f(1) == 3, "f is off")'
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("leave", ["import sys; sys.exit(0)", "raise SystemExit", "import os; os._exit(0)"])
def test_leaving_before_the_end_fails(leave):
    # A generated solution that exits early must not skip its tests and count as passed.
    result = run(f"{leave}\nassert False")
    assert result.status == "failed" and "before the end" in result.reason, result


def test_an_infinite_loop_is_killed_at_the_wall_clock_limit():
    result = run("""
        import os
        print(os.getpid(), flush=True)
        while True:
            pass
    """, timeout_s=2.0, cpu_s=60)
    assert result.status == "timeout" and "wall-clock" in result.reason, result
    assert 2.0 <= result.wall_s < 4.0
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(result.stdout), 0)


def test_a_cpu_burner_is_stopped_at_the_cpu_limit():
    result = run("while True:\n    pass\n", timeout_s=10.0, cpu_s=1)
    assert result.status == "timeout" and "CPU" in result.reason, result
    assert result.wall_s < 5.0


def test_a_fork_bomb_is_refused():
    # Were fork allowed this would make 64 sleeping processes (the wall-clock kill would end them): bounded.
    result = run("""
        import os, time
        for _ in range(6):
            os.fork()
        time.sleep(30)
    """, timeout_s=5.0)
    assert result.status == "refused" and "os.fork" in result.reason, result
    assert result.wall_s < 3.0


@pytest.mark.parametrize("program, event", [
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import subprocess\nsubprocess.Popen(['sleep', '30'])", "subprocess.Popen"),
    ("import os\nos.system('true')", "os.system"),
    ("import os\nos.posix_spawn('/bin/true', ['true'], {})", "os.posix_spawn"),
    ("import os\nos.execv('/bin/true', ['true'])", "os.exec"),
    ("from multiprocessing import util\nutil.spawnv_passfds(b'/bin/true', [b'true'], [])", "fork_exec"),
])
def test_every_way_to_start_a_process_is_refused(program, event):
    result = run(program)
    assert result.status == "refused" and event in result.reason, result


def test_a_memory_hog_hits_the_memory_limit():
    result = run("block = bytearray(4 * 1024 ** 3)\n", memory_bytes=512 << 20)
    assert result.status == "memory" and "512 MiB" in result.reason, result


@pytest.mark.parametrize("write", [
    "open(TARGET, 'w').write('x')",
    "import os\nos.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
    "import pathlib\npathlib.Path(TARGET).write_text('x')",
    "import os\nos.mkdir(TARGET)",
    "import shutil\nshutil.copy('program.py', TARGET)",
    "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w').write('x')",
    "import os\nos.chdir(os.path.dirname(TARGET))\nopen(os.path.basename(TARGET), 'w').write('x')",
    "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
    "os.open(os.path.basename(TARGET), os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
])
def test_writing_outside_the_folder_is_refused(tmp_path, write):
    target = tmp_path / "x"
    result = run(f"TARGET = {str(target)!r}\n{write}\n")
    assert result.status == "refused" and "sandbox refused" in result.reason, result
    assert not target.exists() and not target.is_symlink()


@pytest.mark.parametrize("change", [
    "import os\nos.remove(VICTIM)",
    "import os\nos.rename(VICTIM, 'stolen')",
    "import os\nos.truncate(VICTIM, 0)",
    "open(VICTIM, 'a').write('more')",
    "import os\nos.chmod(VICTIM, 0o777)",
    "import os\nos.chmod(os.open(VICTIM, os.O_RDONLY), 0o777)",  # through a read-only descriptor
    "import os\nos.link(VICTIM, 'hard')\nopen('hard', 'a').write('more')",
])
def test_changing_a_file_outside_the_folder_is_refused(tmp_path, change):
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    victim.chmod(0o600)
    result = run(f"VICTIM = {str(victim)!r}\n{change}\n")
    assert result.status == "refused", result
    assert victim.read_text() == "intact" and victim.stat().st_mode & 0o777 == 0o600


def test_writing_inside_the_folder_works():
    result = run("""
        import os, shutil, tempfile
        with open("inside.txt", "w") as f:
            f.write("ok")
        assert open("inside.txt").read() == "ok"
        os.makedirs("a/b")
        shutil.copy("inside.txt", "a/b/copy.txt")
        shutil.rmtree("a")
        with tempfile.NamedTemporaryFile() as f:  # TMPDIR is the folder
            f.write(b"x")
        os.remove("inside.txt")
    """)
    assert result.status == "passed", result


@pytest.mark.parametrize("program", [
    "import ctypes",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "import os\nos.kill(os.getppid(), 0)",  # signal 0 only probes: harmless even if it got through
    "import os\nos.mknod('node')",
    "open(DEVICE, 'rb')",
])
def test_escape_hatches_are_refused(program):
    device = next((d for d in ("/dev/kmsg", "/dev/ptmx", "/dev/tty", "/dev/console") if os.path.exists(d)), None)
    if "DEVICE" in program and device is None:
        pytest.skip("no device node to try here")
    result = run(f"DEVICE = {device!r}\n{program}")
    assert result.status == "refused", result


def test_the_network_is_unreachable():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run(f"""
            import socket
            with socket.create_connection(("127.0.0.1", {port}), timeout=2) as s:
                s.sendall(b"hello")
        """)
        assert result.status != "passed", result
        with pytest.raises(BlockingIOError):  # nothing ever connected
            server.accept()
    assert result.status == "refused" and "socket" in result.reason
    # a local socket pair stays usable (asyncio needs one)
    assert run("import asyncio\nasync def f():\n    return 1\nassert asyncio.run(f()) == 1\n").passed


def test_output_is_capped_and_the_parent_stays_small():
    tracemalloc.start()
    try:
        result = run("""
            import sys
            sys.stdout.write("x" * 50_000_000)
            sys.stderr.write("y" * 50_000_000 + "\\nlast line\\n")
        """, max_output_bytes=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.status == "passed" and result.truncated
    assert result.stdout == "x" * (1 << 16)  # the beginning of stdout
    assert len(result.stderr) == 1 << 16 and result.stderr.endswith("y\nlast line\n")  # the end of stderr
    assert peak < 4 << 20, f"parent peaked at {peak / 2**20:.1f} MiB"


def test_the_folder_is_removed_afterwards():
    result = run("import os\nprint(os.getcwd())\n")
    assert result.passed and not os.path.exists(result.stdout.strip())

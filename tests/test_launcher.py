"""The one launcher (``trainer_client.local_server.launched``) that the demo, the tests and the benchmarks
start their servers with: ready only once its route answers 200, the whole process group stopped at the
end of the block, and a child that dies or never gets ready reported with the end of its log. The child
here is Python's own HTTP server, not the generation server (tests/conftest.py starts that one through
it)."""

import os
import sys
import time

import httpx
import pytest

from trainer_client.local_server import ServerStartError, free_port, launched


def test_ready_then_the_whole_group_is_stopped(tmp_path):
    (tmp_path / "ready").write_text("yes")
    port = free_port()
    # the HTTP server starts a grandchild of its own, which must go too
    code = (
        "import subprocess, sys, http.server, functools;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        f"h = functools.partial(http.server.SimpleHTTPRequestHandler, directory={str(tmp_path)!r});"
        f"http.server.ThreadingHTTPServer(('127.0.0.1', {port}), h).serve_forever()"
    )
    url = f"http://127.0.0.1:{port}"
    with launched([sys.executable, "-c", code], url, log_path=tmp_path / "log", ready_path="/ready") as child:
        assert httpx.get(f"{url}/ready").text == "yes"
        assert child.start_seconds > 0 and child.proc.poll() is None
        pgid = os.getpgid(child.proc.pid)
        assert pgid != os.getpgid(0)  # a group of its own
    assert child.proc.poll() is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.1)
    assert not _group_members(pgid), "a process of the child's group outlived the block"


def _group_members(pgid: int) -> list[int]:
    """The live processes of group ``pgid`` (zombies, dead but not yet reaped by their parent, left out)."""
    members = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_a_child_that_dies_is_reported_with_its_log(tmp_path):
    code = "import sys; print('cannot start: no model here', flush=True); sys.exit(3)"
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3 before it was ready.*no model here"):
        with launched(
            [sys.executable, "-c", code], f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "l"
        ):
            pytest.fail("the block ran")


def test_a_child_that_never_gets_ready_is_stopped(tmp_path):
    code = "import time; print('still loading', flush=True); time.sleep(600)"
    started = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)not ready after 1 s.*still loading"):
        url = f"http://127.0.0.1:{free_port()}"
        with launched([sys.executable, "-c", code], url, log_path=tmp_path / "l", timeout=1):
            pytest.fail("the block ran")
    assert time.monotonic() - started < 30  # stopped, not waited for

"""A worker knows at once whether its host's bridge runs (vela.bridge.presence)."""
import os
import subprocess
import sys
import uuid

import pytest

from vela.bridge import presence


@pytest.fixture
def name(monkeypatch):
    monkeypatch.setenv("VELA_NAMESPACE", f"pr{uuid.uuid4().hex[:8]}")
    return f"c{uuid.uuid4().hex[:8]}"


def _holder(name):
    """A process that holds the lock as a bridge does, until killed."""
    code = ("import sys, time; from vela.bridge import presence; presence.hold(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, env=dict(os.environ))
    assert p.stdout.readline() == b"held\n"
    return p


def test_a_killed_bridge_is_seen_at_once_and_a_new_one_too(name):
    seen = presence.Presence(name)
    assert seen.running() is False  # no bridge ever: no file
    bridge = _holder(name)
    try:
        assert seen.running() is True
        bridge.kill()  # SIGKILL: the kernel lets the lock go
        bridge.wait()
        assert seen.running() is False
        os.unlink(presence.lock_path(name))  # (removed, then made again by the next bridge)
        bridge = _holder(name)
        assert seen.running() is True
    finally:
        bridge.kill()
        bridge.wait()
        os.unlink(presence.lock_path(name))


def test_a_second_bridge_of_the_host_is_refused_with_the_reason(name):
    bridge = _holder(name)
    try:
        with pytest.raises(ValueError, match="another vela-bridge of this host already serves cache"):
            presence.hold(name, wait=0.2)
    finally:
        bridge.kill()
        bridge.wait()
        os.unlink(presence.lock_path(name))

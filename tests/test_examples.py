"""The README's first command runs examples/demo.py: it must keep working."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_reports_what_it_promises():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                         text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "fetch_fn ran once" in text
    assert "hits + misses" in text and ": match" in text
    assert "holds 1000 entries" in text
    assert "2000 entries removed on both hosts" in text
    assert "host A now holds 0 entries" in text
    assert "host B reads 1000 orders" in text
    assert "reads 1000 orders (0 lost), size 1000" in text

"""Console scripts end their process with main's exit code, after what a normal exit does that can matter."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=60)


def test_console_exits_with_mains_code_after_atexit_handlers_and_flushed_output(tmp_path):
    mark = tmp_path / "atexit.txt"
    proc = _run("""
        import atexit, sys
        from wsi_toolkit.cli._common import console
        def main():
            atexit.register(lambda: open(sys.argv[1], "w").write("ran"))  # as logging, Ray, tempfile register theirs
            print("buffered output", end="")
            sys.stderr.write("and stderr")
            return 3
        console(main)
    """, str(mark))
    assert proc.returncode == 3
    assert (proc.stdout, proc.stderr) == ("buffered output", "and stderr")
    assert mark.read_text() == "ran"


def test_console_waits_for_a_running_thread(tmp_path):
    """A non-daemon thread still running when main returns finishes first (the normal exit then runs)."""
    mark = tmp_path / "thread.txt"
    proc = _run("""
        import sys, threading, time
        from wsi_toolkit.cli._common import console
        def late():
            time.sleep(0.5)
            open(sys.argv[1], "w").write("finished")
        def main():
            threading.Thread(target=late).start()
            return 4
        console(main)
    """, str(mark))
    assert proc.returncode == 4, proc.stderr
    assert mark.read_text() == "finished"


def test_console_lets_an_uncaught_error_print_its_traceback():
    proc = _run("""
        from wsi_toolkit.cli._common import console
        def main():
            raise RuntimeError("boom")
        console(main)
    """)
    assert proc.returncode == 1
    assert "RuntimeError: boom" in proc.stderr

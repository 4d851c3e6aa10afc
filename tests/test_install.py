"""Installing without a C++ compiler still succeeds (README, Install): setup.py says why the CPU path
was not built and builds nothing else."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_without_a_compiler_succeeds_and_says_why(tmp_path):
    env = {**os.environ, "CC": "false", "CXX": "false"}  # a compiler that fails whatever it is asked
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
         "--build-lib", str(tmp_path / "lib")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the C++ CPU path was not built" in result.stderr
    assert not list(tmp_path.rglob("*.so"))

"""Lint and the generated contract run as tests, so CI fails on either."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flake8_is_clean_across_the_python_tree():
    out = subprocess.run([sys.executable, "-m", "flake8", "services", "tests", "perf", "protos"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_generated_grpc_code_matches_the_protos():
    out = subprocess.run([sys.executable, "protos/generate.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

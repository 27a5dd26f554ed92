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


def test_no_public_proto_imports_the_internal_contract():
    public = sorted((ROOT / "protos" / "taskwheel" / "v1").glob("*.proto"))
    assert public
    for proto in public:
        imports = [line for line in proto.read_text().splitlines() if line.startswith("import ")]
        assert not [line for line in imports if "taskwheel/internal/" in line], proto.name

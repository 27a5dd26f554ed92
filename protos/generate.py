"""Regenerates the Python code for the gRPC contract beside the .proto files.

    python protos/generate.py           # rewrite taskwheel/v1/*_pb2*.py and .pyi
    python protos/generate.py --check   # exit 1 if regenerating would change anything

The generated files are committed so that installing taskwheel needs no protoc; a test runs
--check so that a .proto edit without regeneration fails CI.
"""
import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc
import grpc_tools

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = HERE / "taskwheel" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: pathlib.Path) -> None:
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(HERE)) for p in PACKAGE.glob("*.proto"))
    # The mypy plugins are console scripts installed beside this interpreter.
    bindir = pathlib.Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{HERE}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_names(directory: pathlib.Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(GENERATED)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        generate(tmp_path)
        fresh_dir = tmp_path / "taskwheel" / "v1"
        fresh = generated_names(fresh_dir)
        if opts.check:
            stale = sorted(
                name
                for name in fresh | generated_names(PACKAGE)
                if not (PACKAGE / name).exists()
                or not (fresh_dir / name).exists()
                or not filecmp.cmp(PACKAGE / name, fresh_dir / name, shallow=False)
            )
            if stale:
                print("out of date, run python protos/generate.py:", ", ".join(stale))
                return 1
            return 0
        for name in generated_names(PACKAGE) - fresh:
            (PACKAGE / name).unlink()
        for name in fresh:
            shutil.copyfile(fresh_dir / name, PACKAGE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerates the Python code for the gRPC contract beside the .proto files.

    python protos/generate.py           # rewrite taskwheel/v1/ and taskwheel/internal/v1/ *_pb2*.py and .pyi
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
# The public contract, and the internal one (node to node), which no public file imports.
PACKAGES = (pathlib.Path("taskwheel", "v1"), pathlib.Path("taskwheel", "internal", "v1"))
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: pathlib.Path) -> None:
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(HERE)) for package in PACKAGES for p in (HERE / package).glob("*.proto"))
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
        stale = []
        for package in PACKAGES:
            here, fresh_dir = HERE / package, tmp_path / package
            fresh = generated_names(fresh_dir)
            if opts.check:
                stale += sorted(
                    str(package / name)
                    for name in fresh | generated_names(here)
                    if not (here / name).exists()
                    or not (fresh_dir / name).exists()
                    or not filecmp.cmp(here / name, fresh_dir / name, shallow=False)
                )
                continue
            for name in generated_names(here) - fresh:
                (here / name).unlink()
            for name in fresh:
                shutil.copyfile(fresh_dir / name, here / name)
        if stale:
            print("out of date, run python protos/generate.py:", ", ".join(stale))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

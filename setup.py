"""Declares taskwheel's compiled extensions; everything else lives in pyproject.toml.

Package layout (the folders show the architecture):
  core/                  -> taskwheel.core           compiled hot path every service shares (wheel,
                                                      batcher, sharding, records, protobuf wire)
  services/              -> taskwheel                ingest, timer, dispatch, stores, client, cli; a
                                                      compiled loop one service runs sits in its folder
  protos/taskwheel/v1/   -> taskwheel.v1             the public gRPC contract and its generated code
  protos/taskwheel/internal/v1/ -> taskwheel.internal.v1   the node-to-node contract

TASKWHEEL_DEBUG=1 at build time compiles every extension with line tracing and invariant checks.

Each <name>.pyx whose C declarations others cimport has a <name>.pxd beside it. Cython finds a
module's .pxd by its full name (taskwheel/core/<name>.pxd, taskwheel/dispatch/<name>.pxd)
under an include directory, and the source tree is not laid out that way (taskwheel is
services/, taskwheel.core is core/), so the build points the include path at
build/cython-include, where taskwheel/<package> links to each package's folder.
"""
import glob
import os

from setuptools import Extension, setup
from Cython.Build import cythonize

DEBUG = os.environ.get("TASKWHEEL_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "linetrace": DEBUG,
    "profile": DEBUG,
}
macros = [("CYTHON_TRACE_NOGIL", "1"), ("TASKWHEEL_DEBUG", "1")] if DEBUG else []
compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]


def _pxd_include_root(packages):
    """build/cython-include, holding taskwheel/<package> as a relative link to each folder.

    Links rather than copies: edits to a .pxd take effect at once, and Cython's rebuild checks
    see their real modification times. A link left by a moved tree is replaced.
    """
    root = os.path.abspath(os.path.join("build", "cython-include"))
    for package, folder in packages.items():
        link = os.path.join(root, *package.split("."))
        if os.path.realpath(link) != os.path.realpath(folder):
            if os.path.islink(link):
                os.unlink(link)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(folder, os.path.dirname(link)), link)
    return root


# Python package -> source folder, for every package with compiled modules.
COMPILED_PACKAGES = {
    "taskwheel.core": "core",
    "taskwheel.dispatch": "services/dispatch",
    "taskwheel.ingest": "services/ingest",
    "taskwheel.timer": "services/timer",
    "taskwheel.stores.sqlite": "services/stores/sqlite",
}

# The SQLite reader links the system's shared libsqlite3, the one Python's sqlite3 module links
# (libsqlite3-dev on Debian; services/stores/sqlite/rows.pyx says why it must be the same).
libraries = {"taskwheel.stores.sqlite.rows": ["sqlite3"]}
extensions = [
    Extension(
        name,
        [path],
        define_macros=macros,
        extra_compile_args=compile_args,
        libraries=libraries.get(name, []),
    )
    for package, folder in COMPILED_PACKAGES.items()
    for path in sorted(glob.glob(os.path.join(folder, "*.pyx")))
    for name in [package + "." + os.path.splitext(os.path.basename(path))[0]]
]

setup(
    package_dir={
        "taskwheel": "services",
        "taskwheel.core": "core",
        "taskwheel.v1": "protos/taskwheel/v1",
        "taskwheel.internal": "protos/taskwheel/internal",
        "taskwheel.internal.v1": "protos/taskwheel/internal/v1",
    },
    packages=[
        "taskwheel",
        "taskwheel.core",
        "taskwheel.v1",
        "taskwheel.internal",
        "taskwheel.internal.v1",
        "taskwheel.ingest",
        "taskwheel.timer",
        "taskwheel.dispatch",
        "taskwheel.stores",
        "taskwheel.stores.sqlite",
        "taskwheel.stores.cassandra",
        "taskwheel.client",
        "taskwheel.cli",
        "taskwheel.cluster",
    ],
    package_data={
        "taskwheel.core": ["*.pxd", "*.pyi", "py.typed"],
        "taskwheel.v1": ["*.proto", "*.pyi"],
        "taskwheel.internal.v1": ["*.proto", "*.pyi"],
        "taskwheel": ["py.typed"],
        "taskwheel.stores.cassandra": ["*.cql", "conf/*"],
        "taskwheel.stores.sqlite": ["*.sql"],
        "taskwheel.dispatch": ["*.pxd"],
        "taskwheel.ingest": ["*.pxd"],
        "taskwheel.timer": ["*.pxd"],
    },
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=[_pxd_include_root(COMPILED_PACKAGES)],
        annotate=False,
        force=DEBUG,
    ),
    zip_safe=False,
)

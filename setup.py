"""Declares taskwheel's compiled extensions; everything else lives in pyproject.toml.

Package layout (the folders show the architecture):
  core/                 -> taskwheel.core      compiled hot path (timing wheel, batcher)
  services/             -> taskwheel           ingest, timer, dispatch, stores, client, cli
  protos/taskwheel/v1/  -> taskwheel.v1        the gRPC contract and its generated code

TASKWHEEL_DEBUG=1 at build time compiles the core with line tracing and invariant checks.

Each core/<name>.pyx has a core/<name>.pxd. Cython finds a module's own .pxd by its full name,
taskwheel/core/<name>.pxd under an include directory, and core/ is not laid out that way, so the
build points the include path at build/cython-include, where taskwheel/core links to core/.
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


def _pxd_include_root():
    """build/cython-include, holding taskwheel/core as a relative link to core/.

    A link rather than copies: edits to core/*.pxd take effect at once, and Cython's rebuild
    checks see their real modification times. A link left by a moved tree is replaced.
    """
    root = os.path.abspath(os.path.join("build", "cython-include"))
    link = os.path.join(root, "taskwheel", "core")
    if os.path.realpath(link) != os.path.realpath("core"):
        if os.path.islink(link):
            os.unlink(link)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath("core", os.path.dirname(link)), link)
    return root


# sqlite_rows links the system's shared libsqlite3, the one Python's sqlite3 module links
# (libsqlite3-dev on Debian; see core/sqlite_rows.pyx for why it must be the same).
libraries = {"sqlite_rows": ["sqlite3"]}
extensions = [
    Extension(
        "taskwheel.core." + name,
        [path],
        define_macros=macros,
        extra_compile_args=compile_args,
        libraries=libraries.get(name, []),
    )
    for path in sorted(glob.glob("core/*.pyx"))
    for name in [os.path.splitext(os.path.basename(path))[0]]
]

setup(
    package_dir={
        "taskwheel": "services",
        "taskwheel.core": "core",
        "taskwheel.v1": "protos/taskwheel/v1",
    },
    packages=[
        "taskwheel",
        "taskwheel.core",
        "taskwheel.v1",
        "taskwheel.ingest",
        "taskwheel.timer",
        "taskwheel.dispatch",
        "taskwheel.stores",
        "taskwheel.stores.cassandra",
        "taskwheel.client",
        "taskwheel.cli",
    ],
    package_data={
        "taskwheel.core": ["*.pxd", "*.pyi", "py.typed"],
        "taskwheel.v1": ["*.proto", "*.pyi"],
        "taskwheel": ["py.typed"],
        "taskwheel.stores.cassandra": ["*.cql", "conf/*"],
    },
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=[_pxd_include_root()],
        annotate=False,
        force=DEBUG,
    ),
    zip_safe=False,
)

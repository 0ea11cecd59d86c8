"""Build glue: maps the top-level folders into the `tidegate` namespace and compiles ext/.

Installed code lives under tidegate.core, tidegate.workers and tidegate.ext, so nothing claims
generic top-level names like `core` in site-packages.
"""
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

EXTENSIONS = [
    Extension("tidegate.ext.jsonguard", ["ext/jsonguard.pyx"], extra_compile_args=["-O3"]),
    Extension("tidegate.ext.httpconn", ["ext/httpconn.pyx"], extra_compile_args=["-O3"]),
    Extension("tidegate.ext.tokenbucket", ["ext/tokenbucket.pyx"], extra_compile_args=["-O3"]),
    Extension("tidegate.ext.wsframe", ["ext/wsframe.pyx"], extra_compile_args=["-O3"]),
    Extension("tidegate.ext.ringbuf", ["ext/ringbuf.pyx"], extra_compile_args=["-O3"]),
    Extension("tidegate.ext.logwriter", ["ext/logwriter.pyx"], include_dirs=["ext"], extra_compile_args=["-O3"]),
]

setup(
    packages=[f"tidegate.{top}" + (f".{sub}" if sub else "") for top in ("core", "workers", "ext")
              for sub in ["", *find_packages(top)]],
    package_dir={
        "tidegate.core": "core",
        "tidegate.workers": "workers",
        "tidegate.ext": "ext",
    },
    package_data={"tidegate.ext": ["*.pyx", "*.pxd", "*.h"], "tidegate.core.cache": ["hit_model*.json"]},
    ext_modules=cythonize(EXTENSIONS, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}),
    zip_safe=False,
)

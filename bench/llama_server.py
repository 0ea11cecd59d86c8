"""llama.cpp's own `llama-server`, built from the sources vendored in the llama-cpp-python sdist
(the same llama.cpp tidegate runs), CPU only, cached under bench/.cache/.

    python bench/llama_server.py        # build (once) and print the binary's path
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")


def _version() -> str:
    from importlib.metadata import version
    return version("llama_cpp_python")


def binary() -> str:
    """The path of llama-server, building it first when the cache has none for this version."""
    ver = _version()
    root = os.path.join(CACHE, f"llama-cpp-python-{ver}")
    exe = os.path.join(root, "build", "bin", "llama-server")
    if os.path.exists(exe):
        return exe
    os.makedirs(CACHE, exist_ok=True)
    sdist = glob.glob(os.path.join(CACHE, f"llama_cpp_python-{ver}.tar.gz"))
    if not sdist:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                        "--no-binary", ":all:", "-d", CACHE, "-q"], check=True)
        sdist = glob.glob(os.path.join(CACHE, f"llama_cpp_python-{ver}.tar.gz"))
    src = os.path.join(CACHE, f"llama_cpp_python-{ver}")
    if not os.path.isdir(src):
        with tarfile.open(sdist[0]) as t:
            t.extractall(CACHE, filter="data")
    llama = os.path.join(src, "vendor", "llama.cpp")
    build = os.path.join(root, "build")
    subprocess.run(["cmake", "-S", llama, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return exe


if __name__ == "__main__":
    print(binary())

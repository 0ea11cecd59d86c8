"""llama.cpp's own `llama-server`, built from the sources vendored in the llama-cpp-python sdist
(the same llama.cpp tidegate runs) with the same CPU kernels as the installed llama-cpp-python
(matched_flags), cached under bench/.cache/; with --cuda, with the CUDA backend too (needs nvcc;
bench/gpu.sh uses it).

    python bench/llama_server.py [--cuda]   # build (once) and print the binary's path
"""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")


def _version() -> str:
    from importlib.metadata import version
    return version("llama_cpp_python")


# llama_print_system_info()'s CPU features -> the ggml cmake options that compile those kernels
FEATURES = {"AVX": ["GGML_AVX", "GGML_SSE42"], "AVX2": ["GGML_AVX2"], "F16C": ["GGML_F16C"], "FMA": ["GGML_FMA"],
            "BMI2": ["GGML_BMI2"], "AVX_VNNI": ["GGML_AVX_VNNI"], "AVX512": ["GGML_AVX512"],
            "AVX512_VBMI": ["GGML_AVX512_VBMI"], "AVX512_VNNI": ["GGML_AVX512_VNNI"],
            "AVX512_BF16": ["GGML_AVX512_BF16"], "AMX_INT8": ["GGML_AMX_TILE", "GGML_AMX_INT8"],
            "LLAMAFILE": ["GGML_LLAMAFILE"], "OPENMP": ["GGML_OPENMP"], "REPACK": ["GGML_CPU_REPACK"]}


def matched_flags() -> list[str]:
    """cmake options that give llama-server the CPU kernels of the llama.cpp tidegate runs (the
    installed llama-cpp-python): a prebuilt wheel is often built for a generic x86-64 (AVX2), and a
    -march=native llama-server would then race AVX-512 kernels against AVX2 ones."""
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode()
    on = {k.strip() for k, _, v in (p.partition("=") for p in info.split("|")) if v.strip() == "1"}
    on = {k.split(":")[-1].strip() for k in on}  # ("CPU : SSE3" -> "SSE3")
    flags = ["-DGGML_NATIVE=OFF"]
    for feat, opts in FEATURES.items():
        flags += [f"-D{o}={'ON' if feat in on else 'OFF'}" for o in opts]
    return flags


def binary(cuda: bool = False) -> str:
    """The path of llama-server with tidegate's CPU kernels (and CUDA when asked), building it first
    when the cache has none for this version and these options."""
    ver = _version()
    root = os.path.join(CACHE, f"llama-cpp-python-{ver}")
    flags = matched_flags() + [f"-DGGML_CUDA={'ON' if cuda else 'OFF'}"]
    tag = hashlib.sha256(" ".join(flags).encode()).hexdigest()[:8]
    build = os.path.join(root, f"build-{'cuda-' if cuda else ''}{tag}")
    exe = os.path.join(build, "bin", "llama-server")
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
    subprocess.run(["cmake", "-S", llama, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF", *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return exe


if __name__ == "__main__":
    print(binary(cuda="--cuda" in sys.argv[1:]))

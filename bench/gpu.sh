#!/usr/bin/env bash
# The LLM benchmarks on a machine with an NVIDIA GPU: GPU vs CPU, tidegate vs its peers.
#
#   bash bench/gpu.sh [--rounds 3] [--tokens 32]     # extra arguments go to bench/llm_peer.py
#
# 1. builds llama-cpp-python with the CUDA backend (CMAKE_ARGS="-DGGML_CUDA=on", the same version
#    as the installed one) into a venv under bench/.cache/gpu-venv that sees the system packages;
# 2. builds llama.cpp's llama-server with CUDA from the same vendored sources (bench/llama_server.py --cuda);
# 3. runs bench/llm_peer.py twice with the same binaries, every peer on every core: --device cpu
#    (no layer offloaded) and --device gpu (every layer), and prints the GPU/CPU ratios.
# Needs nvidia-smi and nvcc (the CUDA toolkit). CI has no GPU: nothing else depends on this script.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu.sh: no NVIDIA driver here (nvidia-smi not found)" >&2; exit 2; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || {
    echo "gpu.sh: the CUDA toolkit (nvcc) is needed to build llama.cpp with CUDA" >&2; exit 2; }
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

VENV=bench/.cache/gpu-venv
VER=$(python3 -c "from importlib.metadata import version; print(version('llama_cpp_python'))")
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -c "import tidegate.core" 2>/dev/null || "$VENV/bin/pip" install -q -e ".[bench]"
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
    echo "building llama-cpp-python $VER with CUDA (several minutes) ..."
    CMAKE_ARGS="-DGGML_CUDA=on" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV/bin/pip" install -q --no-deps --force-reinstall --no-binary llama-cpp-python "llama-cpp-python==$VER"
fi
"$VENV/bin/python" -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'no GPU offload'; print('llama.cpp GPU offload: yes')"
"$VENV/bin/python" bench/llama_server.py --cuda

OUT=bench/results/gpu-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
"$VENV/bin/python" bench/llm_peer.py --device cpu --cpus all "$@" | tee "$OUT/cpu.txt"
"$VENV/bin/python" bench/llm_peer.py --device gpu --cpus all "$@" | tee "$OUT/gpu.txt"
"$VENV/bin/python" - "$OUT" <<'EOF'
import re, sys
def figures(path):
    got = {}
    for line in open(path):
        m = re.match(r"\s+(\S+)\s+(\d+) streams:\s+([\d.]+) tokens/s", line)
        if m:
            got[(m[1], int(m[2]))] = float(m[3])
        m = re.match(r"\s+(\S+)\s+TTFT.*: ([\d.]+) ms", line)
        if m:
            got[(m[1], "ttft")] = float(m[2])
    return got
cpu, gpu = figures(sys.argv[1] + "/cpu.txt"), figures(sys.argv[1] + "/gpu.txt")
print("\nGPU vs CPU (same binaries, every layer offloaded vs none)")
for key in sorted(cpu, key=str):
    if key in gpu:
        what = "TTFT ms" if key[1] == "ttft" else f"{key[1]:2} streams tokens/s"
        print(f"  {key[0]:17} {what:20} cpu {cpu[key]:8.1f}  gpu {gpu[key]:8.1f}  = {gpu[key] / cpu[key]:.2f}x")
EOF

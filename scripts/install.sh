#!/usr/bin/env bash
# Installs bitsweep and everything it calls into ./.venv (idempotent; safe to re-run).
#
# The slow part is llama.cpp: llama-cpp-python has no binary wheel, so it is built from its source
# distribution together with llama.cpp's command-line tools (llama-quantize, llama-imatrix, ...).
# The built wheel is cached under $BITSWEEP_CACHE keyed by version and build flags, so a second
# install on the same machine takes seconds. The same source distribution also provides llama.cpp's
# own HF -> GGUF converter and gguf-py, so conversion and runtime are always the same llama.cpp.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BITSWEEP_VENV:-$ROOT/.venv}
CACHE=${BITSWEEP_CACHE:-$HOME/.cache/bitsweep}
LLAMA_CPP_PYTHON_VERSION=0.3.36
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[install] %s\n' "$*" >&2; }

# x86 SIMD flags for ggml, read from this CPU. We never use -march=native: it compiles llama.cpp's
# AMX kernels, which crash (SIGSEGV in ggml_backend_amx_mul_mat) on some CPUs where AMX is present.
ggml_cpu_args() {
    local flags
    flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
    local args="-DGGML_NATIVE=OFF"
    local pair
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
        avx512_vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if [[ " $flags " == *" ${pair%%:*} "* ]]; then args+=" -DGGML_${pair##*:}=ON"; else args+=" -DGGML_${pair##*:}=OFF"; fi
    done
    echo "$args"
}

llama_cmake_args() {
    local args="-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAMA_BUILD_SERVER=OFF"
    args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF"
    case "$(uname -m)" in
        x86_64) args+=" $(ggml_cpu_args)" ;;
    esac
    echo "$args ${BITSWEEP_EXTRA_CMAKE_ARGS:-}"
}

fetch_llama_sdist() {
    local sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    if [[ ! -f $sdist ]]; then
        log "downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION source distribution"
        mkdir -p "$CACHE/sdist"
        "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$CACHE/sdist" \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    fi
    echo "$sdist"
}

build_llama_wheel() {
    local sdist=$1 cmake_args key wheel_dir
    cmake_args=$(llama_cmake_args)
    key=$(printf '%s' "$LLAMA_CPP_PYTHON_VERSION $cmake_args" | sha256sum | cut -c1-12)
    wheel_dir="$CACHE/wheels/llama-cpp-python-$key"
    if ! compgen -G "$wheel_dir/*.whl" >/dev/null; then
        log "building llama.cpp + llama-cpp-python (10-20 min on 2 cores); CMAKE_ARGS=$cmake_args"
        mkdir -p "$wheel_dir.tmp"
        CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
            "$VENV/bin/pip" wheel --no-deps --no-cache-dir -w "$wheel_dir.tmp" "$sdist" >&2
        mv "$wheel_dir.tmp" "$wheel_dir"
    fi
    compgen -G "$wheel_dir/*.whl" | head -n1
}

# llama.cpp's converter and gguf-py, from the same source distribution as the runtime.
install_llama_converter() {
    local sdist=$1 dest="$VENV/share/llama.cpp" src
    if [[ -f $dest/VERSION && $(cat "$dest/VERSION") == "$LLAMA_CPP_PYTHON_VERSION" ]]; then return; fi
    src=$(mktemp -d)
    tar -xzf "$sdist" -C "$src" --wildcards \
        "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
    rm -rf "$dest" && mkdir -p "$dest"
    cp -r "$src"/*/vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} "$dest/"
    "$VENV/bin/pip" install --quiet --no-deps "$dest/gguf-py"
    echo "$LLAMA_CPP_PYTHON_VERSION" >"$dest/VERSION"
    rm -rf "$src"
}

# A C/C++ toolchain and cmake for llama.cpp (Debian/Ubuntu; skipped when present or not root).
system_packages() {
    local missing=()
    command -v g++ >/dev/null || missing+=(g++)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v git >/dev/null || missing+=(git)
    if ((${#missing[@]})) && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        log "apt-get install ${missing[*]}"
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    # Headless Chromium for the report's MLflow screenshot (Debian 12: ~130 packages, ~530 MB). Optional:
    # without it the workflow skips the screenshot with a message, so a failed install does not stop this one.
    if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        log "apt-get install chromium"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
            log "chromium could not be installed: the report will have no MLflow screenshot"
    fi
}

main() {
    system_packages
    if [[ ! -x $VENV/bin/python ]]; then
        log "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    log "installing Python dependencies (pinned in requirements/lock.txt)"
    # torch is pinned in the same command as everything else so that nothing upgrades it to a CUDA build.
    "$VENV/bin/pip" install --quiet -r "$ROOT/requirements/lock.txt"
    "$VENV/bin/pip" install --quiet --no-deps -r "$ROOT/requirements/nodeps.txt"
    local sdist wheel
    sdist=$(fetch_llama_sdist)
    wheel=$(build_llama_wheel "$sdist")
    # --force-reinstall: a llama-cpp-python of the same version built elsewhere (without the tools or with
    # other CPU flags) must not be mistaken for ours.
    if ! "$VENV/bin/python" - "$wheel" <<'PY'
import sys, importlib.metadata as md
try:
    d = md.distribution("llama_cpp_python")
except md.PackageNotFoundError:
    sys.exit(1)  # not installed yet (a fresh venv): install it
sys.exit(0 if (d.read_text("WHEEL_SOURCE") or "").strip() == sys.argv[1] else 1)
PY
    then
        "$VENV/bin/pip" install --quiet --no-deps --force-reinstall "$wheel"
        echo "$wheel" >"$("$VENV/bin/python" -c 'import importlib.metadata as md; print(md.distribution("llama_cpp_python")._path)')/WHEEL_SOURCE"
    fi
    install_llama_converter "$sdist"
    "$VENV/bin/pip" install --quiet --no-deps -e "$ROOT"
    log "done: $("$VENV/bin/python" -c 'import llama_cpp, torch, transformers; print("llama_cpp", llama_cpp.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then main "$@"; fi

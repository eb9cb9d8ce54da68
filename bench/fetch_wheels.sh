#!/usr/bin/env bash
# Download every wheel a GPU visit needs that the visit machine lacks (../shared/GPU.md: no
# network there; Python 3.12, manylinux x86_64) into .whl/, an ignored folder the device call
# carries (`carry: [".whl"]`; .gitignore lists it); bench/gpu_visit.sh installs them first.
#
# Usage, from the repository root, on a machine with the package registry:
#   bash bench/fetch_wheels.sh            # then: ls .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}
# the benchmark peers and what open_clip imports; versions pinned so visits compare like with like
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 inf-cl==1.2.1 siglip-kernel==0.1.2 memeff==0.3.1)

mkdir -p "$DEST"
for wheel in "${WHEELS[@]}"; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$DEST" "$wheel"
done
echo "wheels in $DEST: $(ls "$DEST" | tr '\n' ' ')"

#!/bin/sh
# The GPU check on a CUDA machine without network whose python3 already holds a CUDA torch and
# torchvision (e.g. a lent GPU box): install dpfpl's remaining needs from the wheels that
# `make gpu-wheels` downloaded (on a machine with pip access) into a temporary folder, then run
# `python3 -m bench.gpu_check` from the repository root with the given arguments.
#
#   sh bench/gpu_offline.sh [WHEEL_DIR] [-- bench.gpu_check arguments]
#
# WHEEL_DIR defaults to .gpu-wheels. Nothing is installed into the machine's own environment.
set -eu
WHEELS=.gpu-wheels
if [ $# -gt 0 ] && [ "$1" != "--" ]; then WHEELS=$1; shift; fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_offline.sh: no wheels in $WHEELS (run 'make gpu-wheels' where pip can download)" >&2
    exit 2
fi
SITE=$(mktemp -d /tmp/dpfpl-site.XXXXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
PYTHONPATH="$SITE:$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec python3 -m bench.gpu_check "$@"

#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py installs on the lent GPU machine, downloaded here (where pip
# reaches a registry) into wheels/ (gitignored), and the check that they travel: the device tool
# carries the working tree (tracked + untracked-not-ignored files) and the carried paths, 64 MiB in all.
#
#   bash benchmarks/gpu_wheels.sh          # then: run(command="python3 benchmarks/gpu_check.py", carry=["wheels"])
#
# That machine: Python 3.12, x86-64, torch 2.11 (CUDA) and triton, without torchao, diffusers,
# optimum-quanto, bitsandbytes or imageio-ffmpeg, and none of their needs it lacks but importlib_metadata
# (see /work/.library/device/KINDS.md). Versions: the ones this project's tests pass with here
# (torchao 0.18 is the first built against torch 2.11). Required wheels always; optional ones only
# while the total stays under the limit (imageio-ffmpeg alone is 68 MB: it never fits; the tests that
# write mp4 files then skip or fail there, and say so). Exit status 1 when the required set does not fit.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS_DIR:-wheels}
LIMIT_MIB=${LIMIT_MIB:-64}
MARGIN_MIB=${MARGIN_MIB:-2}  # room for results and logs written into the tree before a run
REQUIRED=(torchao==0.18.0 diffusers==0.42.1 importlib_metadata==10.2.0 optimum-quanto==0.2.7)
OPTIONAL=(bitsandbytes==0.50.2 imageio-ffmpeg==0.8.1)
PY=${PYTHON:-python3}

download() {  # name==version ... -> $DEST
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$@"
}

tree_bytes() {  # what the device tool sends besides carried paths (wheels/ is ignored, so not counted twice)
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

mkdir -p "$DEST"
download "${REQUIRED[@]}"
limit=$(( (LIMIT_MIB - MARGIN_MIB) * 1024 * 1024 ))
tree=$(tree_bytes)
wheels_bytes() { du -cb "$DEST"/*.whl | tail -1 | cut -f1; }
total=$(( tree + $(wheels_bytes) ))
if (( total > limit )); then
  echo "the required wheels do not fit: tree $tree + wheels $(wheels_bytes) bytes > $limit" >&2
  exit 1
fi
for spec in "${OPTIONAL[@]}"; do
  name=${spec%%==*}
  tmp=$(mktemp -d)
  DEST=$tmp download "$spec"
  size=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
  if (( total + size <= limit )); then
    mv "$tmp"/*.whl "$DEST"/
    total=$(( total + size ))
    echo "optional $spec: $(( size / 1048576 )) MiB, carried"
  else
    rm -f "$DEST"/"${name//-/_}"-*.whl
    echo "optional $spec: $(( size / 1048576 )) MiB, left out (would make $(( (total + size) / 1048576 )) MiB > $(( limit / 1048576 )) MiB)"
  fi
  rm -rf "$tmp"
done
# one version of each distribution: two stop pip's whole install there
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dups" ]]; then
  echo "two versions of: $dups in $DEST; remove the older" >&2
  exit 1
fi
ls -1 "$DEST"/*.whl | xargs -n1 basename
echo "tree $(( tree / 1048576 )) MiB + wheels $(( $(wheels_bytes) / 1048576 )) MiB = $(( total / 1048576 )) MiB of $LIMIT_MIB MiB (margin $MARGIN_MIB MiB)"

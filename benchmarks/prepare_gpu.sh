#!/usr/bin/env bash
# Prepares, on a machine with network, what benchmarks/gpu.sh needs on a GPU machine without any, in git-ignored
# folders of the checkout that travel with it:
#   .whl/                            the wheels of benchmarks/gpu-wheels.txt, for that machine's Python
#   data/tinyshakespeare/input.txt   the corpus, where the project looks for it by default
#   .peers/nanoGPT/                  nanoGPT (MIT), the reference measured beside the project; never committed
# and checks that they, with the checkout's files, stay well under 64 MiB.
#
# Usage: bash benchmarks/prepare_gpu.sh [--python-version 3.12] [--nanogpt DIR] [--corpus FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=3.12
NANOGPT=../shared/peers/nanoGPT
CORPUS=${CHARGPT_DATA_DIR:-../shared/data}/tinyshakespeare/input.txt
[[ -f data/tinyshakespeare/input.txt ]] && CORPUS=data/tinyshakespeare/input.txt
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
LIMIT_MIB=56  # what travels may be 64 MiB; keep room for the checkout to grow
SHA256=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed  # model/data.py's Tiny Shakespeare

die() { echo "prepare_gpu.sh: error: $*" >&2; exit 2; }
while (($#)); do
  case $1 in
    --python-version) PY_VERSION=${2:?}; shift 2 ;;
    --nanogpt) NANOGPT=${2:?}; shift 2 ;;
    --corpus) CORPUS=${2:?}; shift 2 ;;
    *) die "unknown argument $1 (see the usage at the top of this file)" ;;
  esac
done
[[ -f $NANOGPT/train.py && -f $NANOGPT/data/shakespeare_char/prepare.py ]] || die "no nanoGPT at $NANOGPT (--nanogpt DIR)"
[[ -f $CORPUS ]] || die "no corpus at $CORPUS (--corpus FILE)"
echo "$SHA256  $CORPUS" | sha256sum --check --status || die "$CORPUS is not Tiny Shakespeare (SHA-256 differs)"

# Wheels: one version of each (two stop the install), binary only, for the target's Python and x86-64 Linux.
mkdir -p .whl
rm -f .whl/*.whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_34 manylinux_2_31; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platforms[@]}" -d .whl -r benchmarks/gpu-wheels.txt
wanted=$(grep -cE '^[a-zA-Z]' benchmarks/gpu-wheels.txt)
got=$(find .whl -type f -name '*.whl' | wc -l)
((got == wanted)) || die "$got wheels in .whl for $wanted lines of benchmarks/gpu-wheels.txt"

if [[ $(realpath "$CORPUS") != $(realpath -m data/tinyshakespeare/input.txt) ]]; then
  mkdir -p data/tinyshakespeare
  cp "$CORPUS" data/tinyshakespeare/input.txt
fi
rm -rf .peers/nanoGPT
mkdir -p .peers
cp -r "$NANOGPT" .peers/nanoGPT
chmod -R u+w .peers/nanoGPT  # a read-only source stays read-only in a copy; the next prepare must remove it

# What travels: tracked files, untracked files git does not ignore, and the three carried folders.
mib() { awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
checkout=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null | mib)
carried=$(find .whl data/tinyshakespeare .peers -type f -print0 | xargs -0 stat -c %s | mib)
total=$(echo "$checkout $carried" | awk '{printf "%.1f", $1 + $2}')
echo "wheels: $got in .whl ($(find .whl -type f -print0 | xargs -0 stat -c %s | mib) MiB); corpus and nanoGPT copied"
echo "travels: checkout $checkout MiB + carried $carried MiB = $total MiB (limit 64, this script's $LIMIT_MIB)"
awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {exit !(t <= l)}' || die "$total MiB would travel, over $LIMIT_MIB MiB"

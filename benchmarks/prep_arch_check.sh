#!/bin/bash
# Prepare benchmarks/run_arch_check.sh's GPU call, here (no GPU), from the repository root:
#   bash benchmarks/prep_arch_check.sh            # BASE=d1a692f by default
# 1. benchmarks/.base_src: `git archive $BASE` unpacked (read-only for git: no checkout, no index change),
#    without benchmarks/results (not needed), with COMMIT (= $BASE, the records' ditpass_commit) and
#    PREP_HEAD (this checkout's HEAD when prepared, to label the working tree). Untracked and NOT
#    git-ignored, so it travels with the working tree by itself; do not `git add` it; delete it after the run.
# 2. .whl/ (git-ignored by /.whl/ in .gitignore, so it must be named in the run call's carry):
#    diffusers 0.42.1 and importlib_metadata 8.7.0, the two packages the GPU machine lacks (its image has
#    torch 2.11, huggingface-hub 1.33, safetensors 0.8, regex, requests, filelock, Pillow, numpy, zipp).
# 3. Prints the size of what will travel (limit 64 MiB).
set -eu
cd "$(dirname "$0")/.."
BASE=${BASE:-d1a692f}
d=benchmarks/.base_src
rm -rf "$d"
mkdir -p "$d"
git archive "$BASE" | tar -x -C "$d"
rm -rf "$d/benchmarks/results"
git rev-parse --short "$BASE" > "$d/COMMIT"
git rev-parse --short HEAD > "$d/PREP_HEAD"
srchash() { (cd "$1" && find ditpass passes -name '*.py' -print0 2>/dev/null | LC_ALL=C sort -z \
             | xargs -0 -r sha256sum | sha256sum | cut -c1-8); }
echo "base: $(cat $d/COMMIT) in $d ($(du -sh $d | cut -f1)), src$(srchash $d); working tree: HEAD $(cat $d/PREP_HEAD)," \
     "src$(srchash .) now (the records' ditpass_commit ends in the hash of what the call sent)"

mkdir -p .whl
for spec in diffusers==0.42.1 importlib_metadata==8.7.0; do
  name=${spec%%==*}; ver=${spec##*==}
  ls .whl/${name}-${ver}-*.whl >/dev/null 2>&1 && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
n=$(ls .whl/*.whl | sed 's/-[0-9].*//' | sort | uniq -d)
[ -z "$n" ] || { echo "two versions of: $n (remove one: they stop the whole install)"; exit 1; }

# what travels: tracked + untracked-not-ignored files, plus the carried .whl/
t=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
     | awk '{s+=$1} END {print s}')
w=$(du -sb .whl | cut -f1)
echo "travels: working tree $((t / 1048576)) MiB + .whl $((w / 1048576)) MiB = $(((t + w) / 1048576)) MiB (limit 64)"

#!/usr/bin/env bash
# Put another commit's tileflow beside this one, for an A/B on the same GPU in one session:
#
#   bash bench/base_tree.sh 14043a6      # writes .base/14043a6 (ignored by git)
#
# then carry `.base` to the device and run `PROFILE_BASE=.base/14043a6 bash bench/gpu_session.sh
# profile-base:80 ...`: the profile of that commit's compiled steps, through this commit's
# bench scripts. The tree holds the commit's tileflow, backends and passes as they are laid out
# in the repository; gpu_session.sh links backends and passes into its tileflow package there
# (as an install maps them), since a carried tree may not keep links.
set -eu
commit=${1:?usage: bash bench/base_tree.sh <commit>}
dir=.base/$commit
rm -rf "$dir"
mkdir -p "$dir"
git archive "$commit" tileflow backends passes | tar -x -C "$dir"
echo "$dir"

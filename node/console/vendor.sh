#!/usr/bin/env bash
# Vendors the console's one third-party library, uPlot (MIT), from the npm package pinned in
# tests/py/npm/package.json, into node/console/vendor/. The copies are committed, so a fresh
# checkout's `cargo build` needs no Node; scripts/test.sh runs this with --check to prove
# they are the pinned package's files.
#   node/console/vendor.sh           # copy from .tools/npm (scripts/test.sh installs it)
#   node/console/vendor.sh --check   # fail if the committed copies differ
set -euo pipefail
cd "$(dirname "$0")/../.."
src=.tools/npm/node_modules/uplot
dst=node/console/vendor
files=(dist/uPlot.iife.min.js:uPlot.iife.min.js dist/uPlot.min.css:uPlot.min.css LICENSE:uPlot.LICENSE)
for f in "${files[@]}"; do
  from=$src/${f%%:*} to=$dst/${f##*:}
  if [[ "${1:-}" == --check ]]; then
    cmp -s "$from" "$to" || { echo "$to differs from $from: run node/console/vendor.sh" >&2; exit 1; }
  else
    cp "$from" "$to"
  fi
done
echo "uPlot $(sed -n 's/.*"version": "\(.*\)".*/\1/p' $src/package.json) vendored in $dst"

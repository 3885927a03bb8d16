#!/usr/bin/env bash
# The dashboard's outside pieces (docs/dashboard.md).
#   bash scripts/setup_dashboard.sh vendor    refresh the chart library the page loads: npm package `uplot`,
#                                             pinned below, copied (minified IIFE + CSS + LICENSE) into
#                                             src/kvbound/server/dashboard/vendor/, which is committed, so neither
#                                             a run nor a pip install needs npm or a CDN
#   bash scripts/setup_dashboard.sh browser   what tests/server/test_dashboard.py drives: Debian's Chromium (the
#                                             test uses it through Playwright; Playwright never downloads a browser)
#                                             = apt-get update -q && apt-get install -y -q chromium
set -euo pipefail
cd "$(dirname "$0")/.."
UPLOT_VERSION=1.6.32
VENDOR=src/kvbound/server/dashboard/vendor

vendor() {
  local build
  build=$(mktemp -d)
  trap 'rm -rf "$build"' RETURN
  npm install --no-audit --no-fund --silent --prefix "$build" "uplot@$UPLOT_VERSION"
  local package="$build/node_modules/uplot"
  mkdir -p "$VENDOR"
  cp "$package/dist/uPlot.iife.min.js" "$package/dist/uPlot.min.css" "$VENDOR/"
  cp "$package/LICENSE" "$VENDOR/LICENSE.uPlot"
  cat > "$VENDOR/README.md" <<EOF
uPlot.iife.min.js, uPlot.min.css and LICENSE.uPlot (MIT) come unchanged from the npm package \`uplot\`
$UPLOT_VERSION (its dist/ and LICENSE). Refresh them with \`bash scripts/setup_dashboard.sh vendor\` after changing
UPLOT_VERSION there.
EOF
  echo "vendored uplot $UPLOT_VERSION into $VENDOR"
}

browser() {
  if ! command -v chromium >/dev/null; then
    apt-get update -q && apt-get install -y -q chromium
  fi
  chromium --version
}

case "${1:-}" in
  vendor) vendor ;;
  browser) browser ;;
  *) echo "usage: bash scripts/setup_dashboard.sh vendor|browser" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The docs as a reader sees them: build the site strictly, serve it on 127.0.0.1 and open every
# page in headless Chromium (docs/scripts/browser_check.py): fails on a console error, raw TeX,
# an image that did not load or a results image a page names but does not show. Screenshots of
# the key pages go to the folder given as $1, else $DOCS_SCREENSHOTS, else
# ${TMPDIR:-/tmp}/ess-po-docs-screenshots (a CI artefact to look at before resolving).
# Assumes the main .venv is active (docs extra installed); installs Debian's chromium if missing
# and fetches MathJax from npm on the first build (cached in ~/.cache/ess-po).
set -euo pipefail
cd "$(dirname "$0")/.."

shots="${1:-${DOCS_SCREENSHOTS:-${TMPDIR:-/tmp}/ess-po-docs-screenshots}}"
site="$(mktemp -d "${TMPDIR:-/tmp}/ess-po-site.XXXXXX")"
trap 'rm -rf "$site"' EXIT

if ! command -v chromium >/dev/null 2>&1; then
  echo "== docs: apt-get install chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

echo "== docs: strict build"
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$site"

echo "== docs: every page in headless Chromium"
python docs/scripts/browser_check.py "$site" --screenshots "$shots"

#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs every test, in three steps:
#   1. the fast tier (pytest -m "not slow", about a minute): unit tests of utils, checkers against
#      planted bugs, student-notebook freshness, executed-order checks;
#   2. every solution notebook executed by nbval in lax mode (the course; it builds the artifacts
#      that step 3 reuses);
#   3. the slow tier (pytest -m slow): every notebook on the hub profile against a local stand-in,
#      the base -> SFT -> DPO pipeline, the book build.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q -m "not slow" tests/ "$@"
python -m pytest -q --nbval-lax -p no:cacheprovider solutions/
python -m pytest -q -m slow tests/ "$@"

#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs every test.
#   unit tests, checker tests, student-notebook freshness, executed-order checks, the
#   base->SFT->DPO pipeline, the book build (pytest tests/), then every solution notebook
#   executed by nbval in lax mode.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q tests/ "$@"
python -m pytest -q --nbval-lax -p no:cacheprovider solutions/

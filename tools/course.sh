#!/usr/bin/env bash
# The README's main command: execute every solution notebook (tiny profile) top to bottom,
# saving outputs and recording times and memory, regenerate the student notebooks, and build
# the book into _build/html.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python tools/run_notebooks.py --record-claims "$@"
python tools/make_student_notebooks.py
jupyter-book build . -W --keep-going
echo "book: $ROOT/_build/html/index.html"

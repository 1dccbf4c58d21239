"""The course's maintenance commands (run as ``python tools/NAME.py``); a package so that they, and the
tests, import each other as ``tools.NAME`` (``pip install -e .`` installs it beside ``utils``)."""

# Sourced by scripts/*.sh: sets SSLT_VENV to a ready virtualenv with sslt (editable) and its test extras.
PYTHON="${PYTHON:-python3}"
hash=$(cat pyproject.toml | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/sslt"
SSLT_VENV="$cache/venv-$hash"
if [ ! -f "$SSLT_VENV/.complete" ]; then
    rm -rf "$SSLT_VENV"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$SSLT_VENV"
    "$SSLT_VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$SSLT_VENV/bin/python" -m pip install -q -e '.[test]' >&2
    touch "$SSLT_VENV/.complete"
else
    # the checkout may have moved (CI clones afresh): re-point the editable install, no downloads
    "$SSLT_VENV/bin/python" -m pip install -q --no-deps -e . >&2
fi
export SSLT_VENV

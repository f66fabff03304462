# Sourced by run-server and run-tests: a virtual environment in the checkout,
# made with the interpreter `python3` resolves to (or $PYTHON), so that nothing
# is installed into the system's Python (Debian and Ubuntu refuse that:
# "externally-managed-environment").

# apt_install PACKAGE...: install Debian packages, with sudo when not root.
apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    if ! command -v apt-get >/dev/null; then
        echo "error: please install $* with your system's package manager" >&2
        return 1
    fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# The interpreter's real path and version: a venv made by another interpreter
# (an older checkout's, another python3 on PATH) is made anew rather than reused.
_interpreter_id='import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)), sys.version.split()[0])'

# ensure_venv DIR: make (or reuse) the venv DIR with $PYTHON (default python3)
# and set VENV_PYTHON to its interpreter.
ensure_venv() {
    local venv="$1" python="${PYTHON:-python3}" want have
    if ! want="$("$python" -c "$_interpreter_id")"; then
        echo "error: no working '$python' (set PYTHON to a Python 3.11 or newer)" >&2
        return 1
    fi
    if [ -e "$venv" ]; then
        have="$("$venv/bin/python" -c "$_interpreter_id" 2>/dev/null || true)"
        if [ "$have" != "$want" ]; then
            if [ ! -f "$venv/pyvenv.cfg" ]; then
                echo "error: $venv exists and is not a virtual environment; move it away" >&2
                return 1
            fi
            echo "$venv was made by ${have:-an interpreter that no longer runs}; making it anew"
            rm -rf "$venv"
        fi
    fi
    if [ ! -e "$venv" ]; then
        if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
            # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) apart.
            rm -rf "$venv"
            local version
            version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
            echo "'$python -m venv' needs python$version-venv: installing it"
            apt_install "python$version-venv"
            "$python" -m venv "$venv"
        fi
    fi
    VENV_PYTHON="$venv/bin/python"
    echo "Python: $venv uses ${want% *} (${want##* })"
}

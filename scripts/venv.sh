#!/bin/sh
# Makes the project's virtual environment with a Python of at least 3.11, or keeps the one that works.
#
#   scripts/venv.sh .venv     # what `make setup` runs before it installs the requirements
#   scripts/venv.sh --find    # only prints the Python it would use
#
# The Python: $PYTHON when set (`make setup PYTHON=python3.12`), else the first of python3.13,
# python3.12, python3.11 and python3 that is 3.11 or newer, as the pinned numpy, TensorFlow and JAX
# need. Without one it stops, naming the versions it found and how to get a newer one.
# A venv that has no pip (what `python3 -m venv` leaves where python3.X-venv is not installed), or
# whose Python is older, is removed and made again: installing into it could never succeed.
set -u
MINIMUM_MINOR=11  # Python 3.11

say() {  # each argument a line on stderr (printf is built in: this runs before anything is installed)
  printf '%s\n' "$@" >&2
}

version_of() {  # "3.12" for a working interpreter, nothing for anything else
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

new_enough() {  # is "3.12" (say) 3.11 or newer?
  case "$1" in
    3.[0-9]*) [ "${1#3.}" -ge "$MINIMUM_MINOR" ] 2>/dev/null ;;
    *) return 1 ;;
  esac
}

find_python() {
  found=""
  for candidate in ${PYTHON:-python3.13 python3.12 python3.11 python3}; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    version=$(version_of "$candidate")
    if new_enough "$version"; then
      echo "$candidate"
      return 0
    fi
    found="$found${found:+, }$candidate is ${version:-not a working Python}"
  done
  say "error: imgcls needs Python 3.$MINIMUM_MINOR or newer (the pinned numpy, TensorFlow and JAX do); found: ${found:-no ${PYTHON:-python3}}." \
    "Install one, then run make again (or name it: make setup PYTHON=/path/to/python3.11):" \
    "  Debian 12 (3.11), Ubuntu 24.04 (3.12): sudo apt install python3 python3-venv" \
    "  Ubuntu 22.04 and older: sudo add-apt-repository ppa:deadsnakes/ppa && sudo apt install python3.11 python3.11-venv" \
    "  uv: uv python install 3.11, then make setup PYTHON=\$(uv python find 3.11)" \
    "  pyenv: pyenv install 3.11 && pyenv local 3.11"
  return 2
}

python=$(find_python) || exit 2
if [ "${1:-}" = "--find" ]; then
  echo "$python"
  exit 0
fi
venv=${1:?usage: scripts/venv.sh VENV | --find}

if [ -e "$venv" ] || [ -L "$venv" ]; then
  venv_version=$(version_of "$venv/bin/python")
  if ! new_enough "$venv_version"; then
    say "$venv: its Python is ${venv_version:-missing or broken}, not 3.$MINIMUM_MINOR or newer; making it again with $python"
  elif ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    say "$venv: has no pip (a venv creation that failed?); making it again with $python"
  else
    exit 0
  fi
  rm -rf "$venv"
fi

version=$(version_of "$python")
if ! "$python" -m venv "$venv" || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  say "error: $python could not make a virtual environment with pip in $venv." \
    "On Debian and Ubuntu, venv and ensurepip come in a package of their own: sudo apt install python$version-venv" \
    "then run make again."
  exit 2
fi

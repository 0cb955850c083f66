# Sourced by demo.sh, test.sh and .ci/run: create (or reuse) the project's virtual environment and
# install the project into it. A venv with torch is ~6 GB and takes minutes to build, so it lives
# outside the checkout and is reused by every clone on this machine.
#   WSI_TOOLKIT_VENV   where the venv lives (default: ~/.venvs/wsi-toolkit)
#   WSI_TOOLKIT_EXTRAS which extras to install (default: train,pretrained,dev,view,ray,openvino: all the tests cover)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WSI_TOOLKIT_VENV:-$HOME/.venvs/wsi-toolkit}"
EXTRAS="${WSI_TOOLKIT_EXTRAS:-train,pretrained,dev,view,ray,openvino}"
PYTHON_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment $VENV (first time: several minutes, torch is large)" >&2
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON_BIN" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if [ "${WSI_TOOLKIT_INSTALLED:-}" != "$REPO_ROOT[$EXTRAS]" ]; then  # once per shell (.ci/run, then test.sh)
  echo "[env] installing wsi-toolkit[$EXTRAS] into $VENV" >&2
  "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[$EXTRAS]" 2> >(grep -v -e '^ *!!' -e 'editable' -e '\*\*\*' -e 'precedence' -e 'WheelFile' -e '^ *$' >&2)
  export WSI_TOOLKIT_INSTALLED="$REPO_ROOT[$EXTRAS]"
fi
export PATH="$VENV/bin:$PATH"

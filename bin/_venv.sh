# Sourced by bin/t2i and bin/test: makes sure .venv exists and matches pyproject.toml.
# torch and torchvision are pinned to the pair that pip finds on this kind of machine's disk
# (../shared/ENVIRONMENT.md); everywhere else pyproject's ranges apply.
set -euo pipefail
T2I_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T2I_VENV="${T2I_VENV:-$T2I_ROOT/.venv}"
T2I_TORCH="${T2I_TORCH:-torch==2.14.1 torchvision==0.29.1}"
stamp="$T2I_VENV/.t2i-installed"
want="$(cat "$T2I_ROOT/pyproject.toml" "$T2I_ROOT/bin/_venv.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "t2i: setting up $T2I_VENV (first run only; a few minutes)" >&2
    [ -x "$T2I_VENV/bin/python" ] || python3 -m venv "$T2I_VENV"
    # shellcheck disable=SC2086  # T2I_TORCH is a list of requirement specifiers
    "$T2I_VENV/bin/pip" install --quiet --disable-pip-version-check $T2I_TORCH
    "$T2I_VENV/bin/pip" install --quiet --disable-pip-version-check -e "$T2I_ROOT[test,tables]"
    echo "$want" > "$stamp"
fi
export PATH="$T2I_VENV/bin:$PATH"

#!/usr/bin/env bash
# A separate venv for peer benchmarks (benchmarks/dalle_prior.py): the same torch as the project's
# .venv (the pin in bin/_venv.sh, from the same local index through pip's configuration) plus the
# peer dalle-pytorch, kept out of the project's own dependencies. Idempotent: once set up, it only
# checks a stamp. With arguments it runs them with the peer venv first on PATH:
#
#     bash benchmarks/peer_venv.sh                                      # set up only
#     bash benchmarks/peer_venv.sh python benchmarks/dalle_prior.py    # set up if needed, then run
#
# T2I_PEER_VENV overrides the location (default benchmarks/.peer/.venv, ignored by .gitignore's
# ".venv/"); T2I_PEER_TORCH overrides the torch requirement.
#
# dalle-pytorch 1.6.6 declares taming-transformers-rom1504 (needs an old pytorch_lightning API) and
# youtokentome (does not build here), so it is installed with --no-deps plus the modules its
# `import dalle_pytorch` actually reaches. Of the two, only taming is imported then (by
# dalle_pytorch/vae.py: `from taming.models.vqgan import VQModel, GumbelVQ`, used only by VQGanVAE);
# youtokentome is imported by dalle_pytorch/tokenizer.py alone, which `import dalle_pytorch` does not
# load. So the venv gets a stand-in `taming` package whose VQModel and GumbelVQ raise if built.
set -euo pipefail
T2I_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER_VENV="${T2I_PEER_VENV:-$T2I_ROOT/benchmarks/.peer/.venv}"
torch_pin="$(grep -o 'torch==[0-9][0-9.]*' "$T2I_ROOT/bin/_venv.sh" | head -n 1 || true)"
PEER_TORCH="${T2I_PEER_TORCH:-${torch_pin:-torch==2.14.1}}"
PEER_PACKAGES=(dalle-pytorch==1.6.6 axial_positional_embedding==0.3.12 rotary-embedding-torch==0.9.1)
PEER_DEPS=(einops==0.8.2 numpy pillow requests pyyaml tqdm packaging omegaconf==2.4.0 "setuptools<81")

stamp="$PEER_VENV/.t2i-peer-installed"
want="$( (cat "${BASH_SOURCE[0]}"; echo "$PEER_TORCH") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "peer_venv: setting up $PEER_VENV (first run only; a few minutes)" >&2
    [ -x "$PEER_VENV/bin/python" ] || python3 -m venv "$PEER_VENV"
    pip=("$PEER_VENV/bin/pip" install --quiet --disable-pip-version-check)
    # shellcheck disable=SC2086  # PEER_TORCH may be a list of requirement specifiers
    "${pip[@]}" $PEER_TORCH
    "${pip[@]}" "${PEER_DEPS[@]}"
    "${pip[@]}" --no-deps "${PEER_PACKAGES[@]}"
    site="$("$PEER_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/taming/models"
    echo '"""Stand-in for taming-transformers (see benchmarks/peer_venv.sh); not the real package."""' \
        > "$site/taming/__init__.py"
    : > "$site/taming/models/__init__.py"
    cat > "$site/taming/models/vqgan.py" <<'EOF'
"""Stand-in for taming.models.vqgan so that `import dalle_pytorch` works (benchmarks/peer_venv.sh):
only dalle_pytorch.VQGanVAE builds these, and the benchmarks do not use it."""


class VQModel:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("taming-transformers is a stand-in in this venv (benchmarks/peer_venv.sh)")


class GumbelVQ(VQModel):
    pass
EOF
    "$PEER_VENV/bin/python" -W ignore -c 'from dalle_pytorch import DALLE, DiscreteVAE'
    echo "$want" > "$stamp"
fi
if [ "$#" -gt 0 ]; then
    export PATH="$PEER_VENV/bin:$PATH"
    cd "$T2I_ROOT"
    exec "$@"
fi

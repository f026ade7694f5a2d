#!/usr/bin/env bash
# Set up wan in a virtual environment (.venv by default) on a fresh machine.
#
#   scripts/setup.sh            kernel + the default plugins (torch-only ones)
#   scripts/setup.sh --test     ... plus the test dependencies
#   scripts/setup.sh --gpu      ... plus the CUDA attention plugins and their libraries
#
# WAN_VENV picks the environment folder; WAN_TORCH the torch requirement used when torch is
# not installed yet (default: the CUDA build from PyPI where nvidia-smi exists, else 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${WAN_VENV:-.venv}"
with_test=0
with_gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --gpu) with_gpu=1 ;;
    *) echo "setup.sh: unknown option $arg (use --test or --gpu)" >&2; exit 2 ;;
  esac
done

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${WAN_TORCH:-}" ]; then
    "${pip[@]}" "$WAN_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.4,<3"
  else
    "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.4,<3"
  fi
fi

# The default plugins need nothing but torch.
default_plugins=(attention_sdpa cfg_schedules timestep_sampling quant_fp8 offload_blockswap)
targets=(-e .)
for name in "${default_plugins[@]}"; do
  [ -f "plugins/$name/pyproject.toml" ] && targets+=(-e "plugins/$name")
done
if [ "$with_test" = 1 ]; then
  targets=(-e ".[test]" "${targets[@]:2}")
fi
"${pip[@]}" "${targets[@]}"

# The CUDA attention plugins: with --test, install the plugins alone (their libraries need a
# GPU build) so their CPU tests run and they report themselves unavailable; with --gpu, install
# them with their libraries.
gpu_plugins=(attention_xformers attention_sage attention_flash)
if [ "$with_test" = 1 ] && [ "$with_gpu" = 0 ]; then
  # attention_example is the documented third-party template: its own tests run in the suite.
  for name in "${gpu_plugins[@]}" attention_example; do
    [ -f "plugins/$name/pyproject.toml" ] && "${pip[@]}" --no-deps -e "plugins/$name"
  done
fi
if [ "$with_gpu" = 1 ]; then
  for name in "${gpu_plugins[@]}"; do
    [ -f "plugins/$name/pyproject.toml" ] && "${pip[@]}" -e "plugins/$name" \
      || echo "setup.sh: plugins/$name could not be installed with its library here; see its README" >&2
  done
fi
echo "wan is installed in $venv (activate it with: . $venv/bin/activate)"

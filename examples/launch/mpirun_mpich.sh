#!/bin/bash
# MPICH's mpirun / mpiexec (Hydra; pip install mpich, or Intel MPI, which shares its flags).
# Run from the repository root:
#   bash examples/launch/mpirun_mpich.sh                          one node
#   HOSTFILE=hosts.txt NPROC=16 PPN=8 bash examples/launch/mpirun_mpich.sh   several nodes
# autopar reads PMI_RANK/PMI_SIZE; rank 0's address is broadcast over MPI. Hydra passes the whole
# environment (AUTOPAR_GRID included) to every rank by default.
set -euo pipefail
NPROC=${NPROC:-4}                 # EDIT: ranks in all
PPN=${PPN:-$NPROC}                # EDIT: ranks per node
GRID=${GRID:-x=2}                 # EDIT: the grid
SCRIPT=${SCRIPT:-examples/train_gpt.py}   # EDIT: the training script
ARGS=${ARGS:-}                    # EDIT: the script's arguments
HOSTS=()
if [ -n "${HOSTFILE:-}" ]; then HOSTS=(-f "$HOSTFILE"); fi     # EDIT: one host name per line
AUTOPAR_GRID="$GRID" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    mpirun -n "$NPROC" -ppn "$PPN" "${HOSTS[@]}" python $SCRIPT $ARGS

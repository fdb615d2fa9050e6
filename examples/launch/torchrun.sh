#!/bin/bash
# torchrun command lines. Run from the repository root:
#   bash examples/launch/torchrun.sh                 one node (this machine)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash examples/launch/torchrun.sh   on node 0, then
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 bash examples/launch/torchrun.sh   on node 1
set -euo pipefail
NPROC=${NPROC:-4}                 # EDIT: ranks per node (GPUs per node on a GPU machine)
NNODES=${NNODES:-1}               # EDIT: nodes
GRID=${GRID:-pp=2,x=2}            # EDIT: the grid; dp is inferred from NPROC*NNODES
SCRIPT=${SCRIPT:-examples/train_gpt.py}   # EDIT: the training script
ARGS=${ARGS:---microbatches 2}    # EDIT: the script's arguments
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$NNODES" -eq 1 ]; then
    # Single node: --standalone runs its own rendezvous on a free port.
    torchrun --standalone --nproc-per-node "$NPROC" $SCRIPT --grid "$GRID" $ARGS
else
    # Several nodes: the same line on every node; MASTER_ADDR is a host every node can reach.
    torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "${NODE_RANK:?set NODE_RANK}" \
        --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
        --rdzv-id "${JOB_ID:-autopar}" $SCRIPT --grid "$GRID" $ARGS
fi

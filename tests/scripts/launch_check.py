"""Started by tests/test_real_launch.py under torchrun, mpirun and srun.

Calls ``autopar.init(x=X)`` with no launcher argument, all-reduces each rank's number over the
world and over its x group, and prints one JSON line for the test to check. ``X`` is the first
argument (default 2); a grid that does not fit the world must make ``init`` raise on every rank.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import autopar

torch.set_num_threads(1)
grid = autopar.init(x=int(sys.argv[1]) if len(sys.argv) > 1 else 2, timeout=90)
world_sum = torch.tensor([float(grid.rank)])
dist.all_reduce(world_sum)
x_sum = torch.tensor([float(grid.rank)])
dist.all_reduce(x_sum, group=grid.group("x"))
report = json.dumps({"rank": grid.rank, "world": dist.get_world_size(), "local_rank": grid.local_rank,
                     "launcher": grid.launcher, "coords": grid.coords,
                     "world_sum": world_sum.item(), "x_sum": x_sum.item()})
# One write per line: the ranks share one pipe, and print() may write the newline separately.
os.write(sys.stdout.fileno(), f"LAUNCH_CHECK {report}\n".encode())
autopar.destroy()

"""Imported once by the fork server that ``mp.RankPool`` forks its ranks from: the imports every
rank needs (``mp._freeze_imports``), frozen out of the garbage collector's reach, so that each
forked rank starts with them for free and shares their memory until it writes to it."""
import os

os.environ["OMP_NUM_THREADS"] = "1"  # read when torch loads; the ranks run one thread each

import mp  # noqa: E402

mp._freeze_imports()

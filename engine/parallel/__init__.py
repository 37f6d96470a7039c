"""Several processes, one video: CFG-parallel and Ulysses sequence-parallel generation over
torch.distributed (NCCL on CUDA, gloo on the CPU), giving the single-process result.

groups.py (modes, checks, the rank grid), collectives.py (traceable functional collectives, their
time, the agreement of arguments), fingerprint.py (argument digests), sharding.py (the Ulysses layout
and all-to-alls), model.py (one rank's transformer forward), decode.py (VAE tiles across ranks).
"""

from .collectives import Comm, agree_or_raise, broadcast_int, gather_floats, raise_together
from .fingerprint import checkpoint_digest, digests
from .groups import MODES, Mesh, check_mode, init_from_env, make_mesh, parallel_device
from .model import ParallelTransformer

__all__ = ["MODES", "Comm", "Mesh", "ParallelTransformer", "agree_or_raise", "broadcast_int", "check_mode",
           "checkpoint_digest", "digests", "gather_floats", "init_from_env", "make_mesh", "parallel_device", "raise_together"]

import os
import sys

import torch

# The suite is sized for 2 shared cores; keep intra-op threads predictable.
torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, os.path.dirname(__file__))

"""Shared test set-up: run the suite on a small, fixed number of threads so results and timings
do not depend on how many other processes share the machine."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

"""Test set-up: repository root importable, modest threads, CPU only."""
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
torch.set_num_threads(2)

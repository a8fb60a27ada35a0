import os
import sys

# tests import their helpers (dist_utils) by plain name
sys.path.insert(0, os.path.dirname(__file__))

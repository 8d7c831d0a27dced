"""A toy world in which every stage of the FROMAGe/GILL recipe runs for real on a CPU (see ``world.py``)."""

"""Small, self-contained experiments on real data that run on a CPU (see ``docs/``)."""

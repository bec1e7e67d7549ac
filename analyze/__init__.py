"""saelake analyze package (see the issues for what lands here)."""

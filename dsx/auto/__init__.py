"""``dsx.optimize``'s search: candidate plans from the format registry, measured on this machine."""

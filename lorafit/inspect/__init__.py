"""`lorafit inspect`: what an adapter changed, module by module (norms, spectra, ranks, intruder
dimensions, DoRA magnitudes, ‖BA‖ over training), as a Markdown report, JSON and PNGs
(lorafit.inspect.run)."""

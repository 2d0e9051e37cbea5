"""Training room: data loading, memory estimates and the embedded demo task."""

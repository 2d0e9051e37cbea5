"""LoRA adapters: the layer (layer.py), putting it into a model (inject.py), its tensors (state.py)."""

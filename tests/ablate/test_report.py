"""The ablation tables: one slice per axis through the other axes' first values; plot labels name only
what varies."""

from lorafit.ablate.report import axis_slices, labels, markdown

ROWS = [{"name": n, "settings": s, "result": {"exact_match": 0.5, "val_loss": 0.1, "trainable_params": 10}}
        for n, s in [("lora_r=1", {"method": "lora", "lora.r": 1}), ("lora_r=4", {"method": "lora", "lora.r": 4}),
                     ("full", {"method": "full"})]]
AXES = [("method", ["lora", "full"]), ("lora.r", [1, 4])]


def test_slices_hold_the_other_axes_at_their_first_value():
    slices = dict(axis_slices(ROWS, AXES))
    assert [r["name"] for r in slices["method"]] == ["lora_r=1", "full"]  # full has no lora.r: it belongs
    assert [r["name"] for r in slices["lora.r"]] == ["lora_r=1", "lora_r=4"]
    text = markdown("t", ROWS, AXES)
    assert text.count("| lora_r=1 |") == 3 and "## By lora.r (method = lora)" in text


def test_labels_name_what_varies():
    assert labels(ROWS) == {"lora_r=1": "lora r=1", "lora_r=4": "lora r=4", "full": "full"}
    assert labels(ROWS[:2]) == {"lora_r=1": "r=1", "lora_r=4": "r=4"}

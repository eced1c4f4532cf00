"""Olive's side of bench/peers.py: the data Olive calibrates, evaluates and tunes on.

Loaded by Olive (``user_script``) inside bench/.olive-venv; reads the ``.npz`` that bench/peers.py
writes (``x_<split>`` float32 images, ``y_<split>`` int64 labels), so both tools see the same
images.
"""

import numpy as np
import torch
from olive.data.registry import Registry


class _Split(torch.utils.data.Dataset):
    def __init__(self, path, split, limit=None):
        with np.load(path) as f:
            self.x = torch.from_numpy(f[f"x_{split}"][:limit])
            self.y = torch.from_numpy(f[f"y_{split}"][:limit])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input": self.x[i]}, self.y[i]


@Registry.register_dataset()
def slimkit_npz(data_dir=None, source=None, split="val", limit=None, **kwargs):
    return _Split(source, split, limit)


@Registry.register_post_process()
def slimkit_argmax(output, **kwargs):
    logits = output["logits"] if isinstance(output, dict) else output
    return torch.as_tensor(np.asarray(logits)).argmax(-1)

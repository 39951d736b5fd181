"""TorchServe at its best for the seeds' model: a plain TorchServe handler (no SageMaker toolkit in
between) that runs one forward pass per server-side batch, as TorchServe's batch-inference guide
advises. Same torchvision resnet18, same decode and transform as the seeds' handler
(../sagemaker_stack/inference.py), eager fp32, threads set by torch.set_num_threads.

Runs inside TorchServe's worker (its own virtualenv); bench_torchserve_sweep.py archives it.
"""

import io
import json
import os

import binsight.models.torchvision_compat  # noqa: F401  (see ../sagemaker_stack/inference.py)

# isort: split
import torch
from PIL import Image
from torchvision import models, transforms

TRANSFORM = transforms.Compose(
    [
        transforms.Resize((224, 224)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
)
_model = None


def _load(model_dir):
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    state = torch.load(os.path.join(model_dir, "model.pth"), map_location="cpu")
    model = models.resnet18(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, state["fc.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def handle(data, context):
    global _model
    if _model is None:
        _model = _load(context.system_properties["model_dir"])
    if data is None:  # TorchServe's load-time call
        return None
    bodies = [row.get("body") or row.get("data") for row in data]
    batch = torch.stack([TRANSFORM(Image.open(io.BytesIO(b)).convert("RGB")) for b in bodies])
    with torch.inference_mode():
        probabilities = _model(batch).softmax(dim=1).tolist()
    return [
        json.dumps({"count": max(range(len(p)), key=p.__getitem__), "probabilities": p})
        for p in probabilities
    ]

"""The seeds' endpoint script, as SageMaker's PyTorch serving container runs it (`SAGEMAKER_PROGRAM`):
model_fn / input_fn / predict_fn / output_fn, called by the sagemaker-pytorch-inference toolkit's
handler inside TorchServe's Python worker. Plain torchvision resnet18, full-size JPEG decode, eager
fp32, one image per request, exactly as the capstone notebooks deployed it.

This file runs in its own virtualenv (TorchServe's stack), never binsight's; bench_serve.py writes the
weights to model_dir/model.pth from a binsight checkpoint.
"""

import io
import json
import os

# PyPI's torchvision wheel is built against CUDA torch; with the CPU torch wheel its C++ extension
# fails to load. binsight's shim (put on PYTHONPATH by bench_serve.py) declares the missing operator
# schemas first; the models and transforms are pure Python.
import binsight.models.torchvision_compat  # noqa: F401

# isort: split
import torch
from PIL import Image
from torchvision import models, transforms

NUM_CLASSES = int(os.environ.get("BINSIGHT_NUM_CLASSES", "6"))
TRANSFORM = transforms.Compose(
    [
        transforms.Resize((224, 224)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
)


def model_fn(model_dir):
    model = models.resnet18(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, NUM_CLASSES)
    model.load_state_dict(torch.load(os.path.join(model_dir, "model.pth"), map_location="cpu"))
    return model.eval()


def input_fn(request_body, content_type):
    if content_type in ("image/jpeg", "application/x-image"):
        return TRANSFORM(Image.open(io.BytesIO(request_body)).convert("RGB")).unsqueeze(0)
    raise ValueError(f"unsupported content type {content_type}")


def predict_fn(input_object, model):
    with torch.no_grad():
        return model(input_object).softmax(dim=1)


def output_fn(prediction, accept):
    probabilities = prediction[0].tolist()
    count = max(range(len(probabilities)), key=probabilities.__getitem__)
    return json.dumps({"count": count, "probabilities": probabilities})

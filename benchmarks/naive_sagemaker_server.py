"""The baseline for bench_serve.py: an endpoint written the way the SageMaker PyTorch inference toolkit
has users write one (model_fn / input_fn / predict_fn / output_fn), served one image per call.

Eager PyTorch, full-size JPEG decode, torchvision transforms, one request at a time per worker (as the
toolkit's model server does), on the same checkpoint binsight exports.

Run: python benchmarks/naive_sagemaker_server.py CHECKPOINT PORT
"""

from __future__ import annotations

import io
import json
import sys
import threading

from binsight.models import torchvision_compat  # noqa: F401  (before torchvision: see its docstring)

# isort: split
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from torchvision import transforms

from binsight.training.checkpoint import load_checkpoint
from binsight.training.evaluate import load_model


def model_fn(checkpoint_path: str) -> tuple[torch.nn.Module, int]:
    model, config, _ = load_model(load_checkpoint(checkpoint_path))
    return model.eval(), config.image_size


def input_fn(body: bytes, size: int) -> torch.Tensor:
    image = Image.open(io.BytesIO(body)).convert("RGB")
    transform = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return transform(image).unsqueeze(0)


def predict_fn(batch: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.head.probabilities(model(batch))


def output_fn(probabilities: torch.Tensor) -> bytes:
    probs = probabilities[0].tolist()
    return json.dumps(
        {"count": int(max(range(len(probs)), key=probs.__getitem__)), "probabilities": probs}
    ).encode()


def main() -> None:
    model, size = model_fn(sys.argv[1])
    app = FastAPI()
    one_at_a_time = threading.Lock()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        body = await request.body()
        with one_at_a_time:
            result = output_fn(predict_fn(input_fn(body, size), model))
        return Response(result, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


if __name__ == "__main__":
    main()

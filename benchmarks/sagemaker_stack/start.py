"""Start the real SageMaker PyTorch serving stack (sagemaker-pytorch-inference's `serving.main`, which
configures and launches TorchServe with the toolkit's handler service) on loopback only.

The toolkit binds 0.0.0.0 (it runs in a container on SageMaker); here the generated TorchServe
properties are changed to 127.0.0.1 and the config file is written to a temporary place instead of
/etc, and nothing else is altered. Environment (set by bench_serve.py): SAGEMAKER_BASE_DIR (holds
model/model.pth and model/code/inference.py), SAGEMAKER_BIND_TO_PORT, SAGEMAKER_PROGRAM.

Run (in the TorchServe virtualenv): python start.py TS_CONFIG_PATH
"""

import sys

from sagemaker_pytorch_serving_container import serving, torchserve

generate = torchserve._generate_ts_config_properties


def loopback_properties(handler_service):
    return generate(handler_service).replace("http://0.0.0.0:", "http://127.0.0.1:")


torchserve._generate_ts_config_properties = loopback_properties
torchserve.TS_CONFIG_FILE = sys.argv[1]
serving.main()

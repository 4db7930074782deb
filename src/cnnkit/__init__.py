"""cnnkit: train, evaluate and use convolutional image classifiers.

    import cnnkit
    ds = cnnkit.load_dataset("digits")
    result = cnnkit.train(cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=5))
    model, meta = cnnkit.load_model(result.run_dir)
    print(cnnkit.summary(model)["total_params"])
"""
__version__ = "0.1.0"

from .config import TrainConfig  # noqa: E402,F401
from .data import Dataset, Split, load_dataset  # noqa: E402,F401
from .errors import CnnkitError  # noqa: E402,F401
from .modelfile import load_model, read_metadata, save_model  # noqa: E402,F401
from .models import build_model, list_models, summary  # noqa: E402,F401
from .train import predict_logits, train  # noqa: E402,F401

"""A run's set-up: the data and the model fitted to it, then everything the epoch loop carries.

    load_data_and_model(cfg)        the dataset and the model fitted to it (input shape, class count)
    setup(cfg, ds, model, run)      precision, preprocessing, pretrained weights, transfer phases,
                                    augmentation and balancing, the optimizer, and (resume) the state
                                    after the last finished epoch: a Session
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import distributed
from ..augment import BatchAugment, parse_class_presets
from ..augment_policy import policy_or_preset
from ..config import TrainConfig
from ..data import Columns, Dataset, hflip_keeps_class, is_builtin, load_dataset, with_task
from ..decode import RESIZE_METHOD
from ..distributed import World
from ..errors import CnnkitError
from ..hardware import precision_choice
from ..inference import pick_device
from ..modelfile import DataRecord, InputShape, ModelInfo, Preprocessing, TTA
from ..models.registry import architecture_record, build_model, default_input, get_spec
from ..models.summary import format_summary, summary
from ..preprocess import Preprocess
from ..runfolder import RunFolder, load_checkpoint
from .distill import Teacher
from .mix import Mix
from .optim import make_optimizer, set_phase


# ----------------------------------------------------------------------------- data and model
def load_data_and_model(cfg: TrainConfig, quiet: bool = False) -> tuple[Dataset, nn.Module]:
    """Load the data and build the model fitted to it (input shape and class count from the data)."""
    spec = get_spec(cfg.model)
    hint = default_input(spec)
    image_size, channels = cfg.image_size, cfg.channels
    if not is_builtin(cfg.data) and hint is not None:  # folders are decoded straight to what the model expects
        image_size = image_size or hint[1]
        channels = channels or hint[0]
    if image_size is not None:  # before the data is resized to it
        check_training_memory(spec, channels or BUILTIN_CHANNELS.get(str(cfg.data).lower(), 3), image_size,
                              cfg.batch_size, BUILTIN_IMAGES.get(str(cfg.data).lower(), 0), pick_device(cfg.device))
    ds = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=image_size,
                      channels=channels, val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed, quiet=quiet,
                      columns=Columns.of(cfg))
    ds = with_task(ds, cfg.task)
    if ds.task == "multi-label":
        check_multi_label(cfg)
    elif cfg.pos_weight:
        raise CnnkitError(f"--pos-weight weights each label's positives in a multi-label run; {cfg.data} is "
                          f"{ds.task}: use --balance weights")
    if cfg.target_precision and ds.task == "single-label":
        raise CnnkitError("--target-precision sets the threshold of a multi-label or binary model; this run is "
                          "single-label (softmax decides): add --task binary for two classes, or leave it out")
    c, h, w = ds.input_shape
    torch.manual_seed(cfg.seed)  # the same seed gives the same initial weights
    outputs = 1 if ds.task == "binary" else ds.num_classes  # binary: one logit, the second class's
    return ds, build_model(spec, outputs, in_channels=c, image_size=(h, w))


def check_multi_label(cfg: TrainConfig) -> None:
    """Refuse the options that mean one class per image (their multi-label forms are not built yet)."""
    for flag, used in (("--balance", cfg.balance != "none"), ("--augment-class", cfg.augment_class),
                       ("--label-smoothing", cfg.label_smoothing > 0)):
        if used:
            raise CnnkitError(f"{flag} works on one class per image; {cfg.data} is multi-label: leave {flag} out")


BUILTIN_IMAGES = {"mnist": 70_000, "fashion-mnist": 70_000, "cifar10": 60_000, "digits": 1797}  # held in memory
BUILTIN_CHANNELS = {"mnist": 1, "fashion-mnist": 1, "cifar10": 3, "digits": 1}


def training_bytes_at(spec: dict, channels: int, side: int, batch: int) -> int | None:
    """The estimated memory of training `spec` on side x side images (models/memory.py); None where
    the model cannot take that size (its own error says why)."""
    from ..models.memory import training_bytes
    try:
        with torch.device("meta"):  # nothing is allocated
            model = build_model(spec, 10, in_channels=channels, image_size=(side, side))
            return training_bytes(model, (channels, side, side), batch)
    except (CnnkitError, RuntimeError, ValueError):
        return None


def check_training_memory(spec: dict, channels: int, side: int, batch: int, images: int, device: torch.device) -> None:
    """Refuse an --image-size whose training cannot fit in memory, naming the largest that can.
    images: how many the dataset holds in host memory at that size (0 for folders, which a disk
    cache serves). The model's share is compared with the device's free memory (a GPU's own)."""
    from ..utils import available_memory_bytes, format_bytes
    host = available_memory_bytes()
    on_gpu = device.type == "cuda"
    gpu = torch.cuda.mem_get_info(device)[0] if on_gpu else 0

    def fits(n: int) -> tuple[bool, int | None]:
        model, data = training_bytes_at(spec, channels, n, batch), images * channels * n * n
        if model is None:
            return False, None
        if on_gpu:
            return model <= gpu and data <= host, model
        return model + data <= host, model + data

    ok, need = fits(side)
    if ok or need is None:
        return
    lo, hi = 1, side  # the largest side that fits, by bisection on the estimate (each a meta forward)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid)[0] else (lo, mid - 1)
    where = f"the GPU has {format_bytes(gpu)} free" if on_gpu else f"this machine has {format_bytes(host)} available"
    advice = (f"use --image-size {lo} or less, or a smaller --batch-size" if fits(lo)[0]
              else "use a smaller --batch-size")
    raise CnnkitError(f"--image-size {side} needs about {format_bytes(need)} of memory to train batches of {batch}"
                      f"{' with the dataset resized in memory' if images and not on_gpu else ''}; {where}: {advice}")


def model_info(model: nn.Module, ds: Dataset, preprocess: Preprocess, cfg: TrainConfig, **more) -> ModelInfo:
    """What a model file records about a run besides weights and metrics: enough to rebuild the
    model and preprocess new images exactly as in training (`more`: other ModelInfo fields)."""
    return ModelInfo(
        architecture=architecture_record(model), class_names=ds.class_names, input=InputShape(*ds.input_shape),
        preprocessing=Preprocessing(resize=RESIZE_METHOD, **preprocess.record()), training=cfg.to_dict(), task=ds.task,
        # Test-time augmentation mirrors images unless that changes the class (digits), and shifts
        # them by 1/14 of their side: the notes' 2 pixels on 28x28, 1 on 8x8 digits, 16 on 224x224.
        tta=TTA(hflip=hflip_keeps_class(ds.name), shift_pixels=max(1, round(min(ds.input_shape[1:]) / 14))),
        data=DataRecord(name=ds.name, source=ds.source, sizes=ds.sizes(), test_source=ds.test_source,
                        skipped=[list(x) for x in ds.skipped]), **more)


# ----------------------------------------------------------------------------- set-up
DATA_INIT_IMAGES = 5000  # training images a model's init_from_data sees (airbench's patch whitening: 5,000)


@dataclass(kw_only=True)
class Session:
    """Everything the epoch loop carries from one epoch to the next (built by keyword: setup)."""
    cfg: TrainConfig
    ds: Dataset
    run: RunFolder
    model: nn.Module
    optimizer: torch.optim.Optimizer
    preprocess: Preprocess  # on the training device
    device: torch.device
    precision: str  # 'bf16' or 'fp32'
    transfer: bool  # a frozen-backbone phase first (and maybe a fine-tuning phase)
    total_epochs: int
    info: ModelInfo  # the model file's metadata, less metrics
    augment: BatchAugment  # from cfg.augment_from_epoch on
    mix: Mix = Mix()  # MixUp / CutMix, from cfg.mix_from_epoch until cfg.mix_off_epoch
    teacher: Teacher | None = None  # distillation's teacher (cfg.teacher), on the training device
    class_weight: torch.Tensor | None = None  # (K,) loss weights (balance: weights)
    pos_weight: torch.Tensor | None = None  # multi-label: (K,) weights of each label's positives (--pos-weight)
    sample_weight: torch.Tensor | None = None  # (N,) drawing weights of the training images (balance: sampler)
    ema: nn.Module | None = None  # the moving average of the weights (cfg.ema > 0): what is validated and kept
    ema_steps: int = 0  # optimizer steps averaged so far
    history: list[dict] = field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = 0
    first_epoch: int = 1
    world: World = World()  # this process in a torchrun job (a world of one without torchrun)
    trained: nn.Module | None = None  # what the training steps call: the model, or DistributedDataParallel around it
    callbacks: tuple = ()  # the run's watchers (callbacks.Callback: trackers, tune's pruner), told of steps and epochs

    def phase_of(self, epoch: int) -> str:
        return "fine-tune" if epoch > self.cfg.epochs else ("frozen" if self.transfer else "train")

    @property
    def evaluated(self) -> nn.Module:
        """The model that is validated, kept and tested: the weight average if there is one."""
        return self.ema if self.ema is not None else self.model


@dataclass
class TrainResult:
    model: nn.Module  # the best model by validation accuracy, in eval mode, on `device`
    preprocess: Preprocess
    history: list[dict]  # one row per epoch (history.csv)
    best_epoch: int
    best_val_acc: float
    device: torch.device
    precision: str  # what trained: 'bf16', 'fp32', or the SVM's 'fp64 (scikit-learn)'
    train_seconds: float
    info: ModelInfo  # the model file's metadata, less metrics and calibration


def augmentation_and_balance(cfg: TrainConfig, ds: Dataset, device: torch.device
                             ) -> tuple[BatchAugment, torch.Tensor | None, torch.Tensor | None]:
    """The run's augmentation (preset, fine overrides, per-class presets; flips only where the
    dataset allows them) and class balancing: loss weights (K,) or drawing weights (N,)."""
    flips = hflip_keeps_class(ds.name)
    try:
        default = policy_or_preset(cfg.augment, flips, cfg.augment_overrides(), cfg.randaugment_ops,
                                   cfg.randaugment_magnitude)  # a preset, or RandAugment / TrivialAugment after light
        augment = BatchAugment(default, parse_class_presets(cfg.augment_class, ds.class_names, flips),
                               erasing=cfg.random_erasing)
    except ValueError as e:
        raise CnnkitError(str(e)) from None
    class_weight = sample_weight = None
    if cfg.balance == "none":
        return augment, class_weight, sample_weight
    counts = torch.bincount(ds.train.labels, minlength=ds.num_classes).double()  # (K,)
    if cfg.balance == "weights":  # inverse frequency, mean weight 1 over the images
        class_weight = (counts.sum() / (ds.num_classes * counts.clamp_min(1))).float().to(device)
    elif cfg.balance == "sampler":  # each class drawn equally often
        sample_weight = (1 / counts.clamp_min(1))[ds.train.labels]
    return augment, class_weight, sample_weight


def positive_weights(cfg: TrainConfig, ds: Dataset, device: torch.device) -> torch.Tensor | None:
    """--pos-weight: each label's negatives / positives among the training images (K,), so a label on
    1% of the images weighs its positives 99x (binary_cross_entropy_with_logits' pos_weight)."""
    if not cfg.pos_weight:
        return None
    positives = ds.train.labels.sum(0).double()  # (K,)
    return ((len(ds.train) - positives) / positives.clamp_min(1)).float().to(device)


def setup(cfg: TrainConfig, ds: Dataset, model: nn.Module, run: RunFolder, resume: bool = False,
          world: World = World()) -> Session:
    """Precision, preprocessing, pretrained weights, transfer phases, the optimizer, and (resume)
    the state after the last finished epoch."""
    device = distributed.device_for(world, pick_device(cfg.device))
    if world.active and cfg.batch_size % world.size:
        raise CnnkitError(f"--batch-size {cfg.batch_size} is the global batch: it must be a multiple of the "
                          f"{world.size} processes")
    precision, precision_why = choose_precision(cfg, device, world)
    log_run(run, cfg, ds, model, device, f"{precision} ({precision_why})", world)
    model, preprocess, pretrained = prepare_model(cfg, ds, model, run, device, resume)
    info = model_info(model, ds, preprocess, cfg, pretrained=pretrained,
                      precision={"training": precision, "reason": precision_why})
    augment, class_weight, sample_weight = augmentation_and_balance(cfg, ds, device)
    if augment.active:
        run.log(f"augmentation from epoch {cfg.augment_from_epoch}: {augment.describe(ds.class_names)}")
    mix, teacher = Mix(cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob), None
    if mix.active:
        run.log(f"mixing from epoch {cfg.mix_from_epoch}"
                f"{f' until epoch {cfg.mix_off_epoch - 1}' if cfg.mix_off_epoch else ''}: {mix.describe()}")
    if cfg.teacher:
        teacher = Teacher.load(cfg.teacher, ds, device, cfg.kd_alpha, cfg.kd_temperature)
        teacher.record["val_accuracy_here"] = teacher.accuracy(ds.val.images, ds.val.labels, precision)
        info = dataclasses.replace(info, distillation=teacher.record)
        run.log(f"distillation from {teacher.describe()}; on this run's validation images, at this run's input, it "
                f"decides {teacher.record['val_accuracy_here']:.4f}")
    transfer = cfg.freeze_backbone or cfg.fine_tune
    fine_tune_epochs = (cfg.fine_tune_epochs or cfg.epochs) if cfg.fine_tune else 0
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema > 0 else None
    s = Session(cfg=cfg, ds=ds, run=run, model=model, optimizer=make_optimizer(cfg, model),
                preprocess=preprocess.to(device), device=device, precision=precision, transfer=transfer,
                total_epochs=cfg.epochs + fine_tune_epochs, info=info, augment=augment, mix=mix, teacher=teacher,
                class_weight=class_weight,
                sample_weight=sample_weight, pos_weight=positive_weights(cfg, ds, device), ema=ema, world=world)
    if resume:
        state = resume_state(s, model, ema)
        s.history, s.best_val, s.best_epoch = state["history"], state["best_val_acc"], state["best_epoch"]
        s.first_epoch, s.ema_steps = state["epoch"] + 1, state.get("ema_steps", 0)
        run.log(f"resuming {run.path} after epoch {state['epoch']}")
    s.trained = distributed.wrap(model, world, device)
    return s


def choose_precision(cfg: TrainConfig, device: torch.device, world: World) -> tuple[str, str]:
    """(precision, why) from hardware.precision_choice. Rank 0 chooses for all: probes in several
    processes at once would measure each other."""
    precision, why = precision_choice(cfg.precision, device) if world.primary else ("", "")
    if world.active:
        precision, why = distributed.broadcast_text(f"{precision}|{why}", world).split("|", 1)
    return precision, why


def log_data(run: RunFolder, ds: Dataset) -> None:
    """train.log's lines on the data: sizes, the files skipped and why, a missing test split."""
    run.log(f"data {ds.name}: {ds.sizes()} images of {'x'.join(map(str, ds.input_shape))}, {ds.num_classes} classes "
            f"(from {ds.source})")
    if ds.skipped:
        run.log(f"skipped {len(ds.skipped)} file(s) that could not be read or decoded:")
        for path, reason in ds.skipped:
            run.log(f"  {path}: {reason}")
    if ds.test_source == "val":
        run.log("note: the data has no test split, so test metrics are measured on the validation split")


def log_run(run: RunFolder, cfg: TrainConfig, ds: Dataset, model: nn.Module, device: torch.device,
            precision: str, world: World) -> None:
    """The run header in train.log: the data (and what was skipped), the model's layers, how it trains."""
    log_data(run, ds)
    run.log(format_summary(summary(model), title=f"model {model.architecture.get('name')}"))
    run.log(f"device {device.type}, precision {precision}, {cfg.epochs} epochs of batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr}")
    if world.active:
        run.log(f"data-parallel: {world.size} processes ({'nccl' if device.type == 'cuda' else 'gloo'}), "
                f"{cfg.batch_size // world.size} images of each batch per process")


def prepare_model(cfg: TrainConfig, ds: Dataset, model: nn.Module, run: RunFolder, device: torch.device,
                  resume: bool) -> tuple[nn.Module, Preprocess, dict | None]:
    """Pretrained weights and their normalization (or one fitted to the data), the data-dependent
    initialisation, the frozen backbone of transfer learning, and the model on its device and memory
    format. Returns (model, preprocess on the CPU, the pretrained record or None)."""
    pretrained = None
    if cfg.pretrained:
        from ..models.pretrained import load_pretrained
        pretrained = load_pretrained(model, cfg.pretrained)
        run.log(f"pretrained weights from {pretrained['source']} ({pretrained['loaded_tensors']} tensors"
                f"{', new classifier head' if pretrained['new_head'] else ''})")
    # Pretrained weights expect the normalization they were trained with; otherwise fit it to the data.
    preprocess = (Preprocess(pretrained["mean"], pretrained["std"], cfg.channels_last) if pretrained
                  else Preprocess.fit(ds.train.images, cfg.channels_last))
    init_from_data = getattr(model, "init_from_data", None)
    if init_from_data is not None and not pretrained and not resume:  # e.g. the speedrun net's patch whitening
        init_from_data(preprocess(ds.train.images[:DATA_INIT_IMAGES]))
        run.log(f"data-dependent initialisation from the first {min(DATA_INIT_IMAGES, len(ds.train))} training images")
    if cfg.freeze_backbone or cfg.fine_tune:
        set_phase(model, "frozen")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, preprocess, pretrained


def resume_state(s: Session, model: nn.Module, ema: nn.Module | None) -> dict:
    """Load the newest intact checkpoint into model, optimizer and weight average; one that cannot
    be read is set aside (checkpoint-damaged.safetensors) and the previous one is tried."""
    run = s.run
    while True:
        checkpoint, done, note = run.resume_checkpoint()
        if note:
            run.log(f"note: {note}")
            if checkpoint != run.checkpoint_file and run.checkpoint_file.exists() and run.primary:
                run.set_aside(run.checkpoint_file)
        if s.phase_of(done) == "fine-tune":  # the checkpoint holds the fine-tuning optimizer
            set_phase(model, "all")
            s.optimizer = make_optimizer(s.cfg, model, "fine-tune")
        try:
            return load_checkpoint(checkpoint, model, s.optimizer, {"ema": ema} if ema is not None else None)
        except CnnkitError as e:
            if checkpoint != run.checkpoint_file or not run.previous_checkpoint_file.exists() or not run.primary:
                raise CnnkitError(f"{e}; no earlier checkpoint is intact: start the run again: cnnkit train "
                                  f"--config {run.config_file} --out NEW_FOLDER") from None
            run.log(f"note: {e}; trying the previous checkpoint")
            run.set_aside(checkpoint)

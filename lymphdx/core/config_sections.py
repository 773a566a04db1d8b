"""The config's sections (data, model, training, ...): typed, validated on load.

``lymphdx.core.config`` assembles them into ``Config`` (with the checks that read several
sections), loads presets and files, and re-exports every section.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

# numpy seeds are unsigned 32-bit words; every seed of a config is in [0, SEED_MAX]
SEED_MAX = 2**32 - 1


def _check_seed(v: int) -> int:
    if not 0 <= v <= SEED_MAX:
        raise ValueError("must be in [0, 2**32 - 1] (numpy seeds are unsigned 32-bit numbers)")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: object, info: ValidationInfo) -> object:
        # pydantic reads true/false as 1/0; in a config that is a typo, not a number.
        if isinstance(v, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if set(get_args(annotation) or (annotation,)) <= {int, float, type(None)}:
                raise ValueError("expected a number, not true/false")
        return v


class SplitConfig(_Section):
    """Patient-wise split proportions (train, val, test) used when a manifest has no split."""

    weak: tuple[float, float, float] = (90, 10, 23)
    strong: tuple[float, float, float] = (62, 7, 16)

    @field_validator("weak", "strong")
    @classmethod
    def _proportions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) < 0 or not all(math.isfinite(x) for x in v):
            raise ValueError("proportions (train, val, test) must be finite and >= 0")
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError(
                "train and val need a positive share (training and model selection); "
                "test may be 0 only when the manifest's split column gives the test patients"
            )
        return v


class DataConfig(_Section):
    """Preprocessing: every volume is resampled onto a canonical grid of ``shape`` voxels.

    ``spacing`` and ``shape`` are in ITK order (x, y, z). ``fit``: ``crop`` keeps
    ``spacing`` and centre-crops/pads the field of view; ``resize`` stretches the whole
    field of view onto ``shape`` (spacing then follows from each scan); ``whole`` keeps
    ``spacing`` and the scan's whole field of view, so each scan's grid has its own size
    (``shape`` is null; the network then sees tiles: ``training.sampler: tiles``).

    Intensities: every scan must be in Hounsfield units before the fixed ``hu_window``
    clips it; ``HU = hu_scale * value + hu_offset`` is applied first when either is set
    (the other defaults to 1 or 0); both None: each scan's map is told and checked (see
    ``lymphdx.data.calibration``).
    """

    spacing: tuple[float, float, float] = (5.0, 5.0, 6.0)
    # None with fit: whole (each scan's grid has its own size)
    shape: tuple[int, int, int] | None = (48, 48, 32)
    fit: Literal["crop", "resize", "whole"] = "crop"
    hu_window: tuple[float, float] = (-250.0, 350.0)
    # HU = hu_scale * value + hu_offset for every scan, before anything else (e.g.
    # hu_offset -1024 for files that store raw CT numbers, HU + 1024; hu_scale 8 as well
    # for (HU + 1024) / 8); both None: each scan's map is told from its values, a clean
    # one of the known storage maps corrected, an unclear one refused
    # (lymphdx.data.calibration)
    hu_offset: float | None = None
    hu_scale: float | None = None
    cache_dir: str | None = None  # default: $LYMPHDX_CACHE or ~/.cache/lymphdx
    split_seed: int = 0  # seeds the patient-wise split; shared by all runs of a comparison
    split: SplitConfig = Field(default_factory=SplitConfig)

    @field_validator("spacing", "shape")
    @classmethod
    def _positive(cls, v: tuple | None) -> tuple | None:
        if v is not None and min(v) <= 0:
            raise ValueError("must be positive along x, y and z")
        return v

    @model_validator(mode="after")
    def _shape_for_fit(self) -> DataConfig:
        """``fit: whole`` sizes each scan's grid from its field of view, so ``shape`` is
        null there (a default left in place is dropped; one written is an error);
        ``crop`` and ``resize`` need it."""
        if self.fit == "whole" and self.shape is not None:
            if "shape" in self.model_fields_set:
                raise ValueError(
                    "data.shape has no meaning with data.fit: whole (each scan's grid covers "
                    "its whole field of view at data.spacing): leave it out or set it to null"
                )
            object.__setattr__(self, "shape", None)
        elif self.fit != "whole" and self.shape is None:
            raise ValueError(f"data.fit: {self.fit} needs data.shape (x, y, z voxels)")
        return self

    @field_validator("hu_offset")
    @classmethod
    def _offset(cls, v: float | None) -> float | None:
        if v is not None and not abs(v) <= 10_000:  # also refuses nan and inf
            raise ValueError("must be a finite number of HU between -10000 and 10000")
        return v

    @field_validator("hu_scale")
    @classmethod
    def _scale(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 10_000:  # also refuses nan and inf
            raise ValueError("must be a finite number > 0 and at most 10000 (HU per stored unit)")
        return v

    @field_validator("split_seed")
    @classmethod
    def _split_seed(cls, v: int) -> int:
        return _check_seed(v)

    @field_validator("hu_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("must be (low, high) with low < high")
        return v


class ModelConfig(_Section):
    """3-D DenseNet encoder f, classifier σ (two FC layers) and ROI decoder g."""

    init_features: int = 16
    growth_rate: int = 8
    block_layers: tuple[int, ...] = (2, 2, 2, 2)
    decoder_layers: tuple[int, ...] | None = None  # default: same as block_layers
    bn_size: int = 2
    stem_stride: int = 2
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each dense layer's 3x3 conv
    # dropout before each of the classifier's FC layers (None: model.dropout)
    classifier_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    classifier_hidden: int = 32
    # avg | max | avgmax: the paper's global pooling of the embedding; attention:
    # attention-MIL pooling whose attention is the ROI decoder's map (Ilse et al. 2018;
    # lymphdx.models.multitask.Classifier), so the decoder also learns from scan labels
    pool: Literal["avg", "max", "avgmax", "attention"] = "avgmax"
    # attention pooling: false (default): the attention logits are the ROI logits, and the
    # scan label's gradient reaches the decoder through them (it makes the ROI map a
    # malignancy map too: classification learns fastest, strong Dice falls a little).
    # true: the ROI logits without that gradient plus a zero-initialised 1x1-conv head on
    # the decoder's last features that the label teaches (Dice kept, classification
    # learns far slower in the quick budget; docs/dev-log-2026-11-25_to_2026-12-03.md §7.1)
    attention_head: bool = False
    # attention pooling: the classifier's logit also gets a learnt affine term of the scan's
    # largest ROI logit, a skip past the FC layers (on the synthetic data the largest ROI
    # probability alone separates the weak patients better than the FC layers' reading:
    # docs/dev-log-2026-11-25_to_2026-12-03.md §7.1). off | detached (no label gradient into the
    # decoder through it) | trained (the label's gradient reaches the decoder through it too)
    roi_evidence: Literal["off", "detached", "trained"] = "off"
    # the skip's reading: 1, the largest logit of the map the attention reads; K > 1, the
    # mean of its K largest logits on the decoder's grid (the quick grid's decoder voxel
    # is 10 x 10 x 12 mm = 1.2 mL): the strongest evidence's extent, less one voxel's noise
    roi_evidence_topk: int = Field(1, ge=1)
    # attention pooling: the decoder gets a second output map, a malignancy map, that the
    # attention (and the ROI-evidence skip) read instead of the ROI map. The ROI masks
    # teach both maps, the scan label only this one (through the shared features, not the
    # ROI map's own output), so the ROI map stays a map of all nodes for Dice, FROC,
    # propagation and predict while the classifier reads a map that the label shapes
    malignancy_map: bool = False
    # the malignancy map's share of the gradient into the decoder's shared features (1:
    # all of it; 0: the scan label and the masks teach only the map's own output layer
    # through it, and the features learn from the ROI map's masks alone); read only with
    # malignancy_map: true
    malignancy_grad: float = Field(1.0, ge=0.0, le=1.0)
    # attention pooling: the classifier's logit also gets a learnt affine term of the
    # scan's node volume, the logit of the mean ROI probability over its K most probable
    # voxels on the model's grid (K = this; 20 voxels of 5 x 5 x 6 mm = 3 mL, a sphere of
    # 18 mm), detached: a reading of the largest nodes' size that the masks alone teach
    # (metastatic nodes are the larger ones). 0: off
    node_volume_evidence: int = Field(0, ge=0)
    decoder_skips: bool = False
    # batch | instance | group; domain_batch: domain-specific batch norm (DSBN, Chang et al.
    # 2019): one set of batch statistics and affine parameters per hospital (weak = 0,
    # strong = 1), every other weight shared (lymphdx.models.domain_norm)
    norm: Literal["batch", "instance", "group", "domain_batch"] = "batch"
    # activation checkpointing: "off"; "bottleneck" (Pleiss et al. 2017: each dense layer's
    # concat → norm → act → 1×1 conv is recomputed in backward); "block" (also every
    # encoder/decoder stage is recomputed from its input: least memory, ~1.5× time).
    # true/false are read as "bottleneck"/"off".
    checkpointing: Literal["off", "bottleneck", "block"] = "off"

    @field_validator("roi_evidence", mode="before")
    @classmethod
    def _evidence_bool(cls, v: object) -> object:
        if isinstance(v, bool):  # YAML reads a bare off/on as a boolean
            return "trained" if v else "off"
        return v

    @field_validator("checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, v: object) -> object:
        if isinstance(v, bool):
            return "bottleneck" if v else "off"
        return v

    @model_validator(mode="after")
    def _evidence_needs_attention(self) -> ModelConfig:
        if self.roi_evidence != "off" and self.pool != "attention":
            raise ValueError(
                f"model.roi_evidence {self.roi_evidence!r} reads the ROI decoder's map, which "
                f"only model.pool: attention gives the classifier (pool is {self.pool!r}); "
                "set model.roi_evidence: off with this pooling"
            )
        if self.malignancy_map and self.pool != "attention":
            raise ValueError(
                "model.malignancy_map is the map that attention pooling reads (pool is "
                f"{self.pool!r}); set model.pool: attention or model.malignancy_map: false"
            )
        if self.node_volume_evidence and self.pool != "attention":
            raise ValueError(
                "model.node_volume_evidence reads the ROI decoder's map, which only model.pool: "
                f"attention gives the classifier (pool is {self.pool!r}); set "
                "model.node_volume_evidence: 0 with this pooling"
            )
        if self.malignancy_map and self.attention_head:
            raise ValueError(
                "model.malignancy_map and model.attention_head are two ways to keep the scan "
                "label off the ROI map; set one of them to false"
            )
        return self

    @field_validator("block_layers")
    @classmethod
    def _blocks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 1:
            raise ValueError("needs at least one block of at least one layer")
        return v

    @field_validator("decoder_layers")
    @classmethod
    def _decoder_blocks(cls, v: tuple[int, ...] | None, info: ValidationInfo) -> Any:
        blocks = info.data.get("block_layers")
        if v is not None and blocks is not None and len(v) != len(blocks):
            raise ValueError(f"must have as many blocks as block_layers ({len(blocks)})")
        return v

    @field_validator("stem_stride")
    @classmethod
    def _stride(cls, v: int) -> int:
        if v not in (1, 2, 4):
            raise ValueError("must be 1, 2 or 4")
        return v

    @property
    def downsampling(self) -> int:
        """Input size / embedding size along each axis."""
        return self.stem_stride * 2 ** (len(self.block_layers) - 1)


class LossConfig(_Section):
    """Weights of the four loss terms (paper: all 1)."""

    cls: float = 1.0
    roi: float = 1.0
    pseudo_cls: float = 1.0
    pseudo_roi: float = 1.0


class PropagationConfig(_Section):
    """Label propagation between the two sets (paper §3.2), and the options beyond the paper (all
    off by default: the paper's method)."""

    warmup_epochs: int = 4
    every: int = 2
    roi_threshold: float = Field(0.8, ge=0.0, le=1.0)  # ζ
    pseudo_labels: Literal["hard", "soft"] = "hard"
    confidence: float = Field(0.0, ge=0.0, le=1.0)  # keep strong scans with |2p-1| >= this
    # pseudo class labels of the strong set: "model" (the paper: σ(f(v))) or "graph"
    # (label propagation over a k-NN graph of the pooled embeddings of the weak training
    # scans, with their true labels, and the strong training scans; Iscen et al. 2019;
    # per-scan weight = certainty / its maximum × class weight, the loss then averaged
    # over the batch)
    method: Literal["model", "graph"] = "model"
    # method "model": where the pseudo class labels' threshold lies. "fixed": p > 0.5 (the
    # paper). "prevalence": the strong scans' probabilities are shifted in logit space so
    # that the weak training set's share of positives lies above 0.5 (class-balanced
    # self-training, Zou et al. 2018): a classifier calibrated on one hospital calls
    # nearly every scan of another positive when that hospital shows more node evidence
    threshold: Literal["fixed", "prevalence"] = "fixed"
    graph_k: int = Field(10, ge=1)  # neighbours per node (capped at the node count − 1)
    graph_gamma: float = Field(3.0, gt=0)  # affinity exponent: a_ij = max(0, cos)^γ
    graph_alpha: float = Field(0.99, gt=0, lt=1)  # diffusion: solve (I − αW) Z = Y
    # who labels the other set: "student" (the paper: the model being trained) or "ema"
    # (the mean teacher, an EMA of the student's weights, training.ema_decay)
    teacher: Literal["student", "ema"] = "student"
    tta_flip: bool = False  # pseudo-labels averaged over the scan and its left-right flip
    # curriculum: each round admits the most confident share of the strong set's pseudo
    # class labels, curriculum_start + round · curriculum_step (round 0 = first
    # propagation); the others get weight 0
    curriculum: bool = False
    curriculum_start: float = Field(0.2, ge=0.0, le=1.0)
    curriculum_step: float = Field(0.2, ge=0.0, le=1.0)
    # pseudo ROI masks: voxels with roi_ignore_low <= p <= ζ count nowhere in the loss
    # (None: every voxel counts, the paper)
    roi_ignore_low: float | None = Field(None, ge=0.0, le=1.0)
    # pseudo ROI masks only of weak scans the classifier calls positive, σ(f(v)) >= this
    # (None: all scans, the paper)
    roi_cls_gate: float | None = Field(None, ge=0.0, le=1.0)
    # strategies with an ROI loss: propagation starts at the first due epoch (from
    # warmup_epochs on) at which the teacher's Dice on all strong training + validation
    # scans reaches this, then runs every `every` epochs (None: at warmup_epochs, the paper)
    dice_gate: float | None = Field(None, ge=0.0, le=1.0)
    # kept so that older run folders load; it has no effect since the gate reads all strong
    # training + validation scans at each due epoch (2026-12-07): once it is reached
    # propagation starts, so there is nothing to latch. It used to keep the best
    # strong-validation Dice of any epoch (docs/dev-log-2026-11-25_to_2026-12-03.md §7.3)
    dice_gate_latch: bool = False
    # a propagation whose kept pseudo class labels are all of one class (typically a
    # classifier still at chance on the other hospital) carries no ranking: true drops
    # that round's pseudo class loss (weights 0) instead of teaching the strong set one
    # class; the note in history.csv and train.log is written either way (false: the paper)
    skip_one_class: bool = False


class AugmentationConfig(_Section):
    """Random augmentation of training scans with MONAI transforms (``lymphdx.data.augment``).

    One spatial draw per scan is applied to its image, mask and pseudo-mask alike. Every
    draw is seeded by (run seed, epoch, step, scan), so ``--resume`` replays it.
    """

    enabled: bool = False
    flip_axes: tuple[int, ...] = (0,)  # x = 0 (left-right), y = 1, z = 2; each p = 0.5
    rotate_deg: float = Field(10.0, ge=0)  # uniform in ±rotate_deg about each axis
    scale: float = Field(0.1, ge=0, lt=1)  # isotropic zoom factor in 1 ± scale
    spatial_prob: float = Field(0.5, ge=0, le=1)  # share of scans rotated and scaled
    intensity_scale: float = Field(0.1, ge=0)  # z-scored image × (1 + U(±s))
    intensity_shift: float = Field(0.1, ge=0)  # ... + U(±t)
    noise_std: float = Field(0.05, ge=0)  # Gaussian noise, sd drawn in [0, noise_std]
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # voxels; Gaussian blur sigma range
    intensity_prob: float = Field(0.15, ge=0, le=1)  # each of noise and blur
    # nnU-Net's "simulate low resolution": share of scans downsampled by a zoom drawn in
    # low_res_zoom (nearest) and upsampled back (trilinear), as a coarser acquisition
    # looks (MONAI RandSimulateLowResolutiond); 0: off
    low_res_prob: float = Field(0.0, ge=0, le=1)
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    # share of scans whose contrast is bent by a gamma drawn in gamma_range, on the image
    # rescaled to its [min, max] and back (MONAI RandAdjustContrastd); 0: off
    gamma_prob: float = Field(0.0, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)

    @field_validator("low_res_zoom", "gamma_range")
    @classmethod
    def _ordered_positive(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        low, high = v
        if not 0 < low <= high:
            raise ValueError(f"{info.field_name} must be (low, high) with 0 < low <= high")
        if info.field_name == "low_res_zoom" and high > 1:
            raise ValueError("low_res_zoom must lie in (0, 1]: a zoom below 1 downsamples")
        return v


class TrainingConfig(_Section):
    epochs: int = Field(12, ge=1)
    # strategies with an ROI task: when the strong training set's nodes are small for the
    # grid (median equivalent diameter under 2.5 voxels; train.log says), train this many
    # epochs instead (a larger one only); the run's config.yaml then records it. None: off
    small_node_epochs: int | None = Field(None, ge=1)
    # optimiser steps per epoch; None: one pass over the weak training split (the paper).
    # Set, the weak and the strong set are each drawn from their own endless seeded
    # stream of shuffled passes, so the ROI task's steps do not depend on the weak set's size
    steps_per_epoch: int | None = Field(None, ge=1)
    # epochs at the start that train the ROI decoder alone on the strong set (strategies
    # with an ROI loss; the others start at once)
    roi_warmup_epochs: int = Field(0, ge=0)
    # the strong set's ROI loss on patches of this size (voxels, x y z; each divisible by
    # the model's downsampling; cut to data.shape) instead of whole scans; None: whole
    # scans (the paper)
    roi_patch: tuple[int, int, int] | None = None
    # share of those patches centred on a random node voxel (nnU-Net: 1/3), the rest anywhere
    roi_foreground: float = Field(0.33, ge=0, le=1)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    # the bags' tiles (training.sampler: tiles; the weak and strong scans the classifier
    # reads) augmented otherwise than the ROI patches: the keys given here override
    # training.augmentation's for the tiles alone (config.yaml records the whole section);
    # None: the tiles are augmented as the patches are
    bag_augmentation: AugmentationConfig | None = None
    optimizer: Literal["adam", "adamw"] = "adam"
    batch_size: int = Field(4, ge=1)
    strong_batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    # the rate of each epoch (lymphdx.engine.lr_schedule): constant (the paper), or poly:
    # nnU-Net's lr * (1 - epoch / epochs) ** lr_poly_exponent
    lr_schedule: Literal["constant", "poly"] = "constant"
    lr_poly_exponent: float = Field(0.9, gt=0)
    # which forward passes move the batch norms' running statistics
    # (lymphdx.engine.running_stats): all; patches, only the strong ROI patches' pass (the
    # scans' or bags' pass normalises with its batch statistics and leaves them), so that
    # eval mode normalises as the decoder learnt; a strategy without the patches' pass
    # moves them on every pass
    running_stats: Literal["all", "patches"] = "all"
    weight_decay: float = Field(0.0, ge=0)
    flip_augment: bool = True
    num_threads: int | None = None  # default: all cores, shared by the processes of a node
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    # speed options (lymphdx.engine.performance; measured in BENCHMARKS.md §2.4)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 = CUDA AMP
    channels_last: bool = False  # channels-last-3d memory format
    compile: bool = False  # torch.compile the model
    # scans per step of the strong set's pseudo class labels (when they are whole scans
    # beside ROI patches); None: strong_batch_size
    pseudo_cls_batch_size: int | None = Field(None, ge=1)
    # before training, estimate a step's peak memory and refuse what will not fit
    memory_check: bool = True
    loss: LossConfig = Field(default_factory=LossConfig)
    # decay of the EMA teacher (propagation.teacher: ema, selection: ema), updated after
    # every optimiser step
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    # which weights checkpoints/best.pt holds (evaluate and predict use them):
    #   best_val  the paper: the student at its best validation AUC epoch
    #   ema       the EMA teacher at its best validation AUC (validation scores the EMA)
    #   swa       the uniform average of the last swa_epochs epochs' weights, batch-norm
    #             statistics recomputed on the training set (no choice on validation)
    #   last      a fixed-epoch budget: the final weights (no choice on validation)
    #   ema_last  a fixed budget with the EMA teacher's final weights
    selection: Literal["best_val", "ema", "swa", "last", "ema_last"] = "best_val"
    swa_epochs: int = Field(5, ge=1)  # selection swa: epochs averaged (all, if fewer)
    # keep checkpoints/epoch_XXX.pt of every epoch (the validated weights), e.g. to score
    # a cross-validation fold at an epoch chosen on the pooled folds
    keep_epochs: bool = False
    # how the network sees a scan in training (ARCHITECTURE.md, "Clinical resolution"):
    #   whole  whole volumes on the data.shape grid (the quick and paper presets)
    #   tiles  each scan as a bag of inference.tile tiles: one on each of the
    #          inference.bag_tiles peaks of the teacher's ROI map at the last refresh, plus
    #          bag_random tiles drawn in the body (all drawn before the first refresh);
    #          ROI loss on training.roi_patch patches; scored by sliding window
    sampler: Literal["whole", "tiles"] = "whole"
    bag_random: int = Field(1, ge=0)  # random tiles per scan beside the peak tiles
    # sampler tiles: the bags' peaks are refreshed (the teacher's sliding-window maps of the
    # training scans) at the end of the ROI warm-up (after the first epoch without one),
    # then every this many epochs
    bag_refresh_every: int = Field(2, ge=1)
    # the overlap of the refresh's sliding window (its maps only place the bags' peak
    # tiles); None: inference.overlap. 0 reads each voxel once: about 2.4x fewer tiles
    # than 0.25
    bag_refresh_overlap: float | None = Field(None, ge=0.0, lt=1.0)
    # validation (weak-val AUC, strong-val Dice) every this many epochs and at the last;
    # with a fixed budget (selection last / ema_last) it only draws the learning curves
    validate_every: int = Field(1, ge=1)

    @field_validator("bag_augmentation", mode="before")
    @classmethod
    def _bag_augmentation_over_augmentation(cls, v: object, info: ValidationInfo) -> object:
        # the keys given override training.augmentation's, the rest are its
        base = info.data.get("augmentation")
        if isinstance(v, dict) and isinstance(base, AugmentationConfig):
            return {**base.model_dump(), **v}
        return v


class EvaluationConfig(_Section):
    bootstrap: int = Field(2000, ge=100)
    ci: float = Field(0.95, gt=0, lt=1)
    threshold: float = Field(0.5, ge=0, le=1)
    # test-time augmentation: every scored prediction (evaluate, compare, predict, the
    # detection metrics) averaged over the scan and its left-right flip, the ROI map
    # flipped back first; the flip that training's augmentation draws (nnU-Net mirrors
    # at inference the same way). Training-time validation is not affected.
    tta_flip: bool = False
    # strategies that train the ROI decoder: the scan's probability is the mean of the
    # classifier's and a logistic regression on readings of the ROI map (the soft volume
    # of its largest nodes) and of the image under its most probable voxels, fitted on
    # the run's weak train + val patients after training
    # (lymphdx/engine/roi_readout.py; roi_readout.json in the run folder)
    roi_readout: bool = False
    # which readout (lymphdx.engine.roi_readout.READOUTS): map, a regression on the map's
    # voxel readings (above); nodes, multiple-instance learning over the nodes the map
    # finds, each read for short and long axis, roundness, margin, spread and necrosis at
    # data.spacing, a scan as its most suspicious node (lymphdx/engine/node_readout.py)
    readout: Literal["map", "nodes"] = "map"
    # the readout's share of the scan probability: 0.5, the mean of the classifier and the
    # readout; 1, the readout alone (the classifier's probability still recorded beside it)
    readout_weight: float = Field(0.5, ge=0.0, le=1.0)
    # how every scan is scored (lymphdx.engine.inferer; training's validation and
    # propagation too): whole, one forward pass (quick, paper); sliding_window, tiles of
    # inference.tile blended into the ROI map, the classifier reading the tiles at its
    # peaks: memory set by the tile, not the scan
    inferer: Literal["whole", "sliding_window"] = "whole"
    # the batch-norm statistics every scan is scored with (lymphdx.engine.domain_stats):
    # trained, those training left (a running mix of its batches); per_hospital, each
    # hospital's own, re-estimated after training on its training scans by the inferer's
    # tiles (AdaBN, Li et al. 2016), the weak set's scans then normalised with the weak
    # hospital's and the strong set's with the strong hospital's (RUN/bn_stats.pt)
    # roi_patches: one set re-estimated on the strong set's training scans' ROI patches,
    # drawn as training draws them (lymphdx.engine.patch_stats): what the decoder learnt
    # under, without the bags' tiles that a tile run's running statistics also average
    bn_stats: Literal["trained", "per_hospital", "roi_patches"] = "trained"
    # the gain in AUC declared before looking at the results (default: the paper's
    # ssmdmt − supervised gain) at which compare's design analysis gives each paired
    # test's power, type S and exaggeration and the patients 80% power needs
    # (lymphdx/stats/design.py; compare --effect): context for a test, not a gate; below
    # 0.49 so that a reference AUC of 0.5 plus the gain stays below design.MAX_AUC
    declared_effect: float = Field(0.05, gt=0.0, lt=0.49)
    # how the scan probability (classifier, readout, or their mean) is recalibrated on
    # patients the run did not train on (its validation split; under compare --cv the
    # other folds' out-of-fold predictions): platt (2 parameters, for small sets),
    # isotonic (a step function: needs many patients, ties scores), none
    # (lymphdx.stats.calibration; RUN/calibration.json)
    calibration: Literal["platt", "isotonic", "none"] = "platt"
    # the threshold behind every label (prediction.json, metrics.json's operating_point),
    # chosen on the calibration patients' calibrated probabilities: youden (largest
    # sensitivity + specificity - 1), {sensitivity: S} (the largest threshold that
    # reaches S) or {specificity: S} (the smallest that reaches S), S in (0, 1]
    # (lymphdx.stats.operating_point). evaluation.threshold is used only by runs
    # evaluated before calibration.json existed
    operating_point: str | dict[str, float] = "youden"

    @field_validator("operating_point", mode="before")
    @classmethod
    def _operating_point(cls, v: object) -> object:
        shape = "youden, or one target rate: {sensitivity: S} or {specificity: S}, S in (0, 1]"
        if isinstance(v, str):
            if v != "youden":
                raise ValueError(f"must be {shape}")
            return v
        if not isinstance(v, dict) or len(v) != 1:
            raise ValueError(f"must be {shape}")
        (key, value), *_ = v.items()
        if key not in ("sensitivity", "specificity"):
            raise ValueError(f"unknown target {key!r}: must be {shape}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(f"{key} {value!r} is not a rate in (0, 1]: must be {shape}")
        return {key: float(value)}


class InferenceConfig(_Section):
    """Sliding-window inference (``evaluation.inferer: sliding_window``;
    ``lymphdx.engine.inferer.SlidingWindowInferer``)."""

    # voxels (x, y, z), like data.shape, each divisible by the model's downsampling; a
    # scan smaller than a tile along an axis is padded (with 0, the normalised mean)
    tile: tuple[PositiveInt, PositiveInt, PositiveInt] = (96, 96, 64)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)  # share of a tile that its neighbour overlaps
    tile_batch: int = Field(4, ge=1)  # tiles per forward pass: sets the peak memory
    # gaussian: a tile's centre weighs more than its border (nnU-Net); constant: equal
    blending: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = Field(0.125, gt=0.0)  # gaussian's sigma / the tile's size
    # the classifier's bag: the tiles centred on this many highest ROI-map peaks at least
    # half a tile apart (lymphdx.engine.candidates), attention-pooled together
    bag_tiles: int = Field(4, ge=1)
    # the bag's tiles (voxels x, y, z; the training bags' too), smaller than the sliding
    # window's: a node is a few voxels, so a bag of many small tiles covers all of a
    # scan's candidates for the cost of a few window tiles; None: inference.tile
    bag_tile: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None


class ManifestConfig(_Section):
    """The run's data: the two manifests (absolute paths once resolved)."""

    weak: str | None = None
    strong: str | None = None

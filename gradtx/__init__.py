"""gradtx: small, pure, composable gradient transformations for JAX.

Every public name has exactly one import path, ``gradtx.<name>``; the submodules are the
implementation and may move.
"""

from gradtx.base import (
    EmptyState,
    GradientTransformation,
    identity,
    set_to_zero,
)
from gradtx.combine import (
    MaskedNode,
    MaskedState,
    PartitionState,
    apply_updates,
    chain,
    masked,
    named_chain,
    partition,
)
from gradtx.compilation import compiler_options
from gradtx.optimizers.adabelief import ScaleByBeliefState, adabelief, scale_by_belief
from gradtx.optimizers.adabound import (
    ScaleByAdaBoundState,
    adabound,
    amsbound,
    scale_by_adabound,
)
from gradtx.optimizers.adafactor import FactoredState, adafactor, factored_second_moment
from gradtx.optimizers.adagrad import ScaleByRssState, adagrad, scale_by_rss
from gradtx.optimizers.adam import (
    ScaleByAdamState,
    adam,
    adamw,
    nadam,
    nadamw,
    scale_by_adam,
)
from gradtx.optimizers.adamax import adamax, adamaxw, scale_by_adamax
from gradtx.optimizers.amsgrad import ScaleByAmsgradState, amsgrad, scale_by_amsgrad
from gradtx.optimizers.lamb import lamb
from gradtx.optimizers.lars import lars
from gradtx.optimizers.lion import ScaleByLionState, lion, scale_by_lion
from gradtx.optimizers.novograd import ScaleByNovogradState, novograd, scale_by_novograd
from gradtx.optimizers.qhadam import qhadam, qhadamw, scale_by_qhadam
from gradtx.optimizers.qhm import (
    ScaleByQHMState,
    qhm,
    quasi_hyperbolic_average,
    scale_by_qhm,
)
from gradtx.optimizers.radam import radam, scale_by_radam
from gradtx.optimizers.ranger import ScaleByRangerRAdamState, ranger, scale_by_ranger_radam
from gradtx.optimizers.rmsprop import (
    ScaleByRmsState,
    ScaleByRStdDevState,
    rmsprop,
    scale_by_rms,
    scale_by_stddev,
)
from gradtx.optimizers.sgd import sgd
from gradtx.optimizers.sophia import (
    ScaleBySophiaState,
    gnb_hessian_estimate,
    hutchinson_hessian_estimate,
    scale_by_sophia,
    sophia,
    sophia_h,
)
from gradtx.optimizers.yogi import scale_by_yogi, yogi

# The packed layout (performance engine): arrays in one buffer per dtype, per-array semantics kept.
from gradtx.packed import (
    Packed,
    PackedLayout,
    Stacked,
    map_arrays,
    map_shapes,
    pack,
    pack_state,
    packed_layout,
    unpack,
    unpack_state,
)
from gradtx.schedules import (
    clamp_schedule,
    constant_schedule,
    cosine_decay_schedule,
    cosine_onecycle_schedule,
    cosine_warm_restarts_schedule,
    exponential_decay,
    inverse_sqrt_schedule,
    inverse_time_decay,
    join_schedules,
    linear_onecycle_schedule,
    linear_schedule,
    piecewise_constant_schedule,
    piecewise_interpolate_schedule,
    polynomial_schedule,
    repeat_schedule,
    scale_schedule,
    sgdr_schedule,
    warmup_constant_schedule,
    warmup_cosine_decay_schedule,
    warmup_exponential_decay_schedule,
    with_warmup,
)

# Scale-out: state placement on device meshes and ZeRO-1 state sharding.
from gradtx.sharding.placement import abstract_state, device_bytes, state_shardings
from gradtx.sharding.zero import zero1, zero1_dim
from gradtx.state.accounting import state_bytes, state_bytes_per_parameter

# Memory engine: block-wise 8-bit moment storage (docs/memory.md).
from gradtx.state.quantize import Quantized8bit, QuantizedArray, dequantize_blockwise, quantize_blockwise
from gradtx.transforms.clipping import clip, clip_by_block_rms, clip_by_global_norm
from gradtx.transforms.conditionals import (
    AccumulateGradientsState,
    ApplyIfFiniteState,
    NonFiniteUpdatesWarning,
    accumulate_gradients,
    apply_if_finite,
)
from gradtx.transforms.decay import AddDecayedWeightsState, add_decayed_weights
from gradtx.transforms.momentum import (
    EmaState,
    TraceState,
    ema,
    trace,
)
from gradtx.transforms.plateau import ReduceOnPlateauState, reduce_on_plateau
from gradtx.transforms.scaling import (
    ScaleByScheduleState,
    centralize,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    scale_by_sign,
    scale_by_trust_ratio,
)
from gradtx.wrappers.inject import InjectHyperparamsState, inject_hyperparams
from gradtx.wrappers.lookahead import LookaheadState, lookahead_slow_params, lookahead_wrapper
from gradtx.wrappers.sam import (
    SAMState,
    sam,
    sam_perturb,
    sam_train_step,
)
from gradtx.wrappers.schedule_free import (
    ScheduleFreeState,
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
)

__all__ = [
    # compiler options for jitted steps
    "compiler_options",
    # sharding
    "abstract_state",
    "device_bytes",
    "state_shardings",
    "zero1",
    "zero1_dim",
    # packed layout
    "Packed",
    "PackedLayout",
    "Stacked",
    "map_arrays",
    "map_shapes",
    "pack",
    "pack_state",
    "packed_layout",
    "unpack",
    "unpack_state",
    "AccumulateGradientsState",
    "AddDecayedWeightsState",
    "ApplyIfFiniteState",
    "EmaState",
    "EmptyState",
    "FactoredState",
    "GradientTransformation",
    "InjectHyperparamsState",
    "LookaheadState",
    "MaskedNode",
    "MaskedState",
    "NonFiniteUpdatesWarning",
    "PartitionState",
    "ReduceOnPlateauState",
    "SAMState",
    "ScaleByAdaBoundState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByBeliefState",
    "ScaleByLionState",
    "ScaleByNovogradState",
    "ScaleByQHMState",
    "ScaleByRStdDevState",
    "ScaleByRangerRAdamState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleBySophiaState",
    "ScheduleFreeState",
    "TraceState",
    "accumulate_gradients",
    "adabelief",
    "adabound",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "add_decayed_weights",
    "amsbound",
    "amsgrad",
    "apply_if_finite",
    "apply_updates",
    "centralize",
    "chain",
    "clamp_schedule",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "cosine_warm_restarts_schedule",
    "ema",
    "exponential_decay",
    "factored_second_moment",
    "gnb_hessian_estimate",
    "hutchinson_hessian_estimate",
    "identity",
    "inject_hyperparams",
    "inverse_sqrt_schedule",
    "inverse_time_decay",
    "join_schedules",
    "lamb",
    "lars",
    "linear_onecycle_schedule",
    "linear_schedule",
    "lion",
    "lookahead_slow_params",
    "lookahead_wrapper",
    "masked",
    "nadam",
    "nadamw",
    "named_chain",
    "novograd",
    "partition",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "polynomial_schedule",
    "qhadam",
    "qhadamw",
    "qhm",
    "quasi_hyperbolic_average",
    "radam",
    "ranger",
    "reduce_on_plateau",
    "repeat_schedule",
    "rmsprop",
    "sam",
    "sam_perturb",
    "sam_train_step",
    "scale",
    "scale_by_adabound",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_novograd",
    "scale_by_qhadam",
    "scale_by_qhm",
    "scale_by_radam",
    "scale_by_ranger_radam",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_sign",
    "scale_by_sophia",
    "scale_by_stddev",
    "scale_by_trust_ratio",
    "scale_by_yogi",
    "scale_schedule",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "set_to_zero",
    "sgd",
    "sgdr_schedule",
    "sophia",
    "sophia_h",
    "state_bytes",
    "state_bytes_per_parameter",
    # Memory engine: 8-bit moment storage.
    "Quantized8bit",
    "QuantizedArray",
    "quantize_blockwise",
    "dequantize_blockwise",
    "trace",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
    "with_warmup",
    "yogi",
]

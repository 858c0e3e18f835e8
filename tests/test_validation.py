"""Every public factory rejects bad hyperparameters at construction with a clear message.

The table below classifies every parameter of every public function in ``gradtx.__all__``
by *kind* (learning rate, decay in [0, 1), positive float, length, dtype, schedule, mask,
...); each kind comes with the bad values it must reject. A public function that is
neither classified here nor listed in ``NOT_FACTORIES`` with a reason fails
``test_every_public_function_is_classified``, so a new optimizer cannot ship without
validation. Each error must name the function, the argument, the value and the accepted
range (``"adam: b1 must be in [0, 1), got 1.5"``).
"""

from __future__ import annotations

import inspect
import math
import re

import jax
import jax.numpy as jnp
import pytest

import gradtx

NAN = float("nan")
INF = float("inf")

# Public names that are not factories of a transformation or schedule, with the reason.
NOT_FACTORIES = {
    "apply_updates": "applies updates; takes trees, not hyperparameters (structure errors: test_robustness.py)",
    "state_bytes": "accessor: measures a state",
    "state_bytes_per_parameter": "accessor: measures a state",
    "quantize_blockwise": "per-array codec (array in, QuantizedArray out); its arguments are checked by test_quantize.py",
    "dequantize_blockwise": "per-array codec (QuantizedArray in, array out)",
    "lookahead_slow_params": "accessor: reads the slow weights out of a state",
    "schedule_free_eval_params": "accessor: reads the evaluation parameters out of a state",
    "quasi_hyperbolic_average": "per-array math helper (arrays in, array out)",
    "gnb_hessian_estimate": "Hessian estimator called at run time (params and key in, tree out)",
    "hutchinson_hessian_estimate": "Hessian estimator called at run time (params and key in, tree out)",
    "identity": "takes no arguments",
    "compiler_options": "returns XLA compiler options for jax.jit; its backend argument is checked by test_compilation.py",
    "set_to_zero": "takes no arguments",
    "centralize": "takes no arguments",
    "scale_by_sign": "takes no arguments",
    "abstract_state": "accessor: describes a state (tx and params in, shapes and shardings out)",
    "state_shardings": "accessor: describes a state (tx and params in, shardings out)",
    "device_bytes": "accessor: measures a state",
    "zero1_dim": "per-shape helper (shape and axis size in, dimension out)",
    # Packed layout (performance engine): functions of trees, not factories.
    "pack": "packs a tree of arrays (structure errors: test_packed.py)",
    "unpack": "unpacks a Packed node (type errors: test_packed.py)",
    "packed_layout": "describes a tree of arrays",
    "map_arrays": "lifts a per-array function over trees (layout errors: test_packed.py)",
    "map_shapes": "lifts a per-array shape function over trees",
    "pack_state": "converts a state to the packed layout (structure errors: test_packed.py)",
    "unpack_state": "converts a packed state back",
}

_schedule = gradtx.constant_schedule(0.1)
_tx = gradtx.identity()

# Valid values for required arguments.
REQUIRED = {
    "learning_rate": 0.1, "inner": _tx, "base_optimizer": _tx, "optimizer": _tx, "every_k_schedule": 2,
    "schedule": _schedule, "max_delta": 1.0, "threshold": 1.0, "max_norm": 1.0, "value": 1.0,
    "init_value": 1.0, "decay_steps": 10, "transition_steps": 10, "peak_value": 1.0, "first_period": 10,
    "decay": 0.9, "decay_rate": 0.5, "schedules": [_schedule, _schedule], "boundaries": [5], "period": 10,
    "factor": 0.5, "step_size": 0.1, "step_size_fn": _schedule, "warmup_steps": 5, "end_value": 0.0,
    "power": 1.0, "interpolate_type": "linear", "cosine_kwargs": [{"init_value": 0.0, "peak_value": 1.0, "warmup_steps": 2, "decay_steps": 10}],
    "inner_factory": gradtx.adam, "loss_fn": lambda p: 0.0, "transforms": {"a": _tx}, "param_labels": "a",
    "mask": True,
    "mesh": jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)),
}

# The bad values each kind of argument must reject.
BAD = {
    "learning_rate": ["0.1", NAN, -0.1, [0.1]],
    "positive_rate": ["0.1", NAN, -0.1, 0.0],
    "unit": ["0.9", NAN, -0.1, 1.5, INF],
    "positive": ["1e-8", NAN, -1.0, 0.0],
    "non_negative": ["0", NAN, -1.0],
    "real": ["1.0", NAN, INF, None],
    "optional_real": ["1.0", NAN, INF],
    "positive_int": ["10", 0, -3, 2.5, True],
    "non_negative_int": ["0", -1, 2.5],
    "dtype": [jnp.int32, "int8", 3],
    "schedule": [3.0, "cosine"],
    "transformation": ["adam", 3.0, gradtx.adam],
    "callable": [3.0, "fn"],
    "mask": [3.0, "yes", {"w": 1.5}],
    "bool": ["yes", 2, None],
    "choice": ["nope"],
    "checked_at_init": [],
}

# Kind of every parameter, by name; FACTORY_KINDS overrides it for one factory.
KINDS = {
    "learning_rate": "learning_rate", "final_lr": "positive_rate", "base_learning_rate": "positive_rate",
    "b1": "unit", "b2": "unit", "decay": "unit", "momentum": "unit", "nu": "unit", "nu1": "unit", "nu2": "unit",
    "pct_start": "unit", "pct_final": "unit", "slow_step_size": "unit", "gamma": "unit", "rtol": "unit",
    "eps": "positive", "epsilon": "positive", "max_norm": "positive", "clipping_threshold": "positive",
    "div_factor": "positive", "final_div_factor": "positive", "exponent": "positive", "power": "positive",
    "t_mult": "positive", "m_mult": "positive", "rho": "positive", "smooth_beta": "positive",
    "eps_root": "non_negative", "weight_decay": "non_negative", "weight_decay_rate": "non_negative",
    "initial_accumulator_value": "non_negative", "initial_scale": "non_negative", "min_norm": "non_negative",
    "min_scale": "non_negative", "atol": "non_negative", "r": "non_negative", "weight_lr_power": "non_negative",
    "max_delta": "non_negative", "trust_coefficient": "non_negative", "threshold": "non_negative",
    "init_value": "real", "end_value": "real", "peak_value": "real", "value": "real", "min_value": "real",
    "max_value": "real", "step_size": "real", "alpha": "real",
    "every_k_schedule": "positive_int", "decay_steps": "positive_int", "transition_steps": "positive_int",
    "first_period": "positive_int", "period": "positive_int", "sync_period": "positive_int",
    "update_interval": "positive_int", "patience": "positive_int", "accumulation_size": "positive_int",
    "min_dim_size_to_factor": "positive_int", "max_consecutive_errors": "positive_int",
    "decay_offset": "non_negative_int", "step_offset": "non_negative_int", "transition_begin": "non_negative_int",
    "cooldown": "non_negative_int", "seed": "non_negative_int", "warmup_steps": "non_negative_int",
    "mu_dtype": "dtype", "nu_dtype": "dtype", "accumulator_dtype": "dtype", "dtype_momentum": "dtype",
    "state_dtype": "dtype", "hyperparam_dtype": "dtype", "z_dtype": "dtype",
    "schedule": "schedule", "step_size_fn": "schedule",
    "inner": "transformation", "base_optimizer": "transformation", "optimizer": "transformation",
    "hessian_estimator": "callable", "decay_rate_fn": "callable", "inner_factory": "callable", "loss_fn": "callable",
    "mask": "mask", "weight_decay_mask": "mask", "trust_ratio_mask": "mask",
    "nesterov": "bool", "staircase": "bool", "debias": "bool", "factored": "bool", "multiply_by_parameter_scale": "bool",
    "eps_in_sqrt": "bool", "centered": "bool", "bias_correction": "bool", "bias_correction_mu": "bool",
    "bias_correction_nu": "bool", "use_gc": "bool", "use_grad_mean": "bool", "reset_state": "bool",
    "adaptive": "bool", "amsbound": "bool", "flip_sign": "bool", "has_aux": "bool",
    "mode": "choice", "interpolate_type": "choice",
    # Labels are matched against the parameters' structure, so they are checked at init
    # (test_partition_labels_are_checked_at_init).
    "param_labels": "checked_at_init",
}

_EPS_MAY_BE_ZERO = (
    "adabound", "adagrad", "amsbound", "lars", "novograd", "rmsprop", "sam_perturb", "scale_by_adabound",
    "scale_by_novograd", "scale_by_rms", "scale_by_rss", "scale_by_stddev", "scale_by_trust_ratio", "schedule_free_adamw",
)
FACTORY_KINDS = {
    **{name: {"eps": "non_negative"} for name in _EPS_MAY_BE_ZERO},
    "adabound": {"eps": "non_negative", "learning_rate": "positive_rate"},
    "amsbound": {"eps": "non_negative", "learning_rate": "positive_rate"},
    "scale_by_adabound": {"eps": "non_negative", "learning_rate": "positive_rate"},
    "adafactor": {"decay_rate": "non_negative"},
    "factored_second_moment": {"decay_rate": "non_negative"},
    "inverse_time_decay": {"decay_rate": "positive"},
    "clip_by_block_rms": {"threshold": "positive"},
    "reduce_on_plateau": {"factor": "unit", "rtol": "non_negative"},
    "scale_schedule": {"factor": "real"},
    "inverse_sqrt_schedule": {"warmup_steps": "positive_int"},
    "exponential_decay": {"decay_rate": "positive", "end_value": "optional_real"},
    "warmup_exponential_decay_schedule": {"decay_rate": "positive", "end_value": "optional_real"},
    "clamp_schedule": {"min_value": "optional_real", "max_value": "optional_real"},
    # RAdam's threshold on the SMA length: any real is meaningful (<= 1 means: always rectify).
    **{name: {"threshold": "real"} for name in ("radam", "scale_by_radam")},
    **{name: {"threshold": "optional_real", "eps": "positive"} for name in ("ranger", "scale_by_ranger_radam")},
}

# Arguments whose bad values are specific to one factory: (factory, argument) -> [(bad value,
# the part of it the message must show)].
SPECIAL = {
    ("join_schedules", "schedules"): [(3.0, "3.0"), ([_schedule, 3.0], "3.0"), ([], "[]")],
    ("join_schedules", "boundaries"): [([-1], "-1"), ([2.5], "2.5"), ([5, 5, 5], "[5, 5, 5]"), (5, "5")],
    ("piecewise_constant_schedule", "boundaries_and_scales"): [(3.0, "3.0"), ({-1: 0.5}, "-1"), ({5: "x"}, "'x'")],
    ("piecewise_interpolate_schedule", "boundaries_and_scales"): [(3.0, "3.0"), ({-1: 0.5}, "-1"), ({5: "x"}, "'x'")],
    ("sgdr_schedule", "cosine_kwargs"): [(3.0, "3.0"), ([3.0], "3.0"), ([], "[]"), ({"init_value": 1.0}, "init_value")],
    ("inject_hyperparams", "static_args"): [(3.0, "3.0"), ([1], "[1]")],
    ("partition", "transforms"): [({}, "{}"), (3.0, "3.0"), ({"a": 3.0}, "3.0")],
    ("zero1", "mesh"): [("data", "'data'"), (3.0, "3.0")],
    ("zero1", "axis"): [("batch", "'batch'"), (3, "3")],
}
# Factories with positional-only variadic arguments: (call, argument name, bad value) cases.
VARIADIC = {
    "chain": [(lambda: gradtx.chain(_tx, "adam"), "transforms[1]", "'adam'"),
              (lambda: gradtx.chain(gradtx.adam), "transforms[0]", "adam")],
    "named_chain": [(lambda: gradtx.named_chain(("a", 3.0)), "transform 'a'", "3.0"),
                    (lambda: gradtx.named_chain(("a", _tx), ("a", _tx)), "names", "['a', 'a']"),
                    (lambda: gradtx.named_chain(_tx), "transforms[0]", "GradientTransformation")],
}


def _factories():
    return sorted(
        name for name in gradtx.__all__
        if not inspect.isclass(getattr(gradtx, name)) and callable(getattr(gradtx, name)) and name not in NOT_FACTORIES
    )


def _parameters(name):
    return [
        p for p in inspect.signature(getattr(gradtx, name)).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _kind(name, argument):
    return FACTORY_KINDS.get(name, {}).get(argument, KINDS.get(argument))


def _shown(value):
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)


def _cases():
    cases = []
    for name in _factories():
        for p in _parameters(name):
            pairs = SPECIAL.get((name, p.name)) or [(bad, _shown(bad)) for bad in BAD.get(_kind(name, p.name), [])]
            for bad, shown in pairs:
                # Ids must not contain memory addresses: xdist workers must collect the same names.
                label = re.sub(r" at 0x[0-9a-f]+", "", getattr(bad, "__name__", None) if callable(bad) else repr(bad))
                cases.append(pytest.param(name, p.name, bad, shown, id=f"{name}-{p.name}-{label}"[:80]))
    return cases


CASES = _cases()


def _base_kwargs(name):
    return {p.name: REQUIRED[p.name] for p in _parameters(name) if p.default is inspect.Parameter.empty}


def test_every_public_function_is_classified():
    missing = []
    for name in _factories():
        if name in VARIADIC:
            continue
        parameters = _parameters(name)
        assert parameters, f"{name} takes no arguments: list it in NOT_FACTORIES"
        for p in parameters:
            if (name, p.name) not in SPECIAL and _kind(name, p.name) is None:
                missing.append(f"{name}({p.name})")
    assert not missing, f"parameters without a validation kind (add them to KINDS/SPECIAL): {missing}"
    assert not set(NOT_FACTORIES) - set(gradtx.__all__), "NOT_FACTORIES names something that is no longer public"
    factories = len(_factories())
    bad_inputs = len(CASES) + sum(map(len, VARIADIC.values()))
    print(f"\n{factories} public factories validated with {bad_inputs} bad inputs")
    assert factories >= 80 and bad_inputs >= 600


def test_valid_arguments_are_accepted():
    for name in _factories():
        if name not in VARIADIC:
            getattr(gradtx, name)(**_base_kwargs(name))


@pytest.mark.parametrize("name, argument, bad, shown", CASES)
def test_bad_hyperparameter_is_rejected_with_a_clear_message(name, argument, bad, shown):
    kwargs = {**_base_kwargs(name), argument: bad}
    with pytest.raises((ValueError, TypeError)) as error:
        getattr(gradtx, name)(**kwargs)
    message = str(error.value)
    assert message.startswith(f"{name}: "), message
    assert argument in message, message
    assert "must" in message, message
    assert shown in message or (callable(bad) and getattr(bad, "__name__", "?") in message), message


@pytest.mark.parametrize("name", sorted(VARIADIC))
def test_variadic_factories_reject_bad_transformations(name):
    for call, argument, shown in VARIADIC[name]:
        with pytest.raises((ValueError, TypeError)) as error:
            call()
        message = str(error.value)
        assert message.startswith(f"{name}: ") and argument in message and shown in message and "must" in message, message


def test_partition_labels_are_checked_at_init():
    tx = gradtx.partition({"a": _tx}, {"w": "a", "b": 2})
    with pytest.raises(ValueError, match=r"partition: param_labels uses labels \['2'\] missing from transforms"):
        tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})

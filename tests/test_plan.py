import json

import pytest

from ditpass.plan import Plan, PlanError


# ---- field checks: every message names the field and what to do -------------------------


@pytest.mark.parametrize(
    "kwargs, must_say",
    [
        (dict(ulysses=0), ["ulysses=0", "int >= 1"]),
        (dict(ring=-2), ["ring=-2", "int >= 1"]),
        (dict(dp=1.5), ["dp=1.5", "int >= 1"]),
        (dict(pipefusion=True), ["pipefusion=True", "int >= 1"]),
        (dict(cfg=3), ["cfg=3", "1 (off) or 2", "cfg=1 or cfg=2"]),
        (dict(cfg=4), ["cfg=4", "cfg=2, dp=2"]),
        (dict(compile="tensorrt"), ["compile='tensorrt'", "'inductor'"]),
        (dict(compile="inducter"), ["did you mean 'inductor'"]),
        (dict(attention="flash3"), ["attention='flash3'", "'flash'", "'cudnn'"]),
        (dict(patches=4), ["patches=4", "pipefusion=1", "set pipefusion > 1"]),
        (dict(pipefusion=4, patches=2), ["patches=2", "pipefusion=4", "patches >= 4"]),
        (dict(pipefusion=2, patches=0), ["patches=0", "int >= 1"]),
        (dict(warmup_steps=-1), ["warmup_steps=-1", ">= 0"]),
        (dict(fastattn=3), ["fastattn=3", "True (calibrate)"]),
        (dict(overrides=[("blocks.*", {"fastatn": False})]), ["'fastatn'", "'fastattn'"]),
        (dict(overrides=[("blocks.*", {"fastattn": "no"})]), ["fastattn='no'", "bool"]),
        (dict(overrides=[("blocks.*", {"attention": "fast"})]), ["attention='fast'", "'math'"]),
        (dict(overrides=["blocks.*"]), ["overrides=", "(module-path glob, dict) pairs"]),
    ],
)
def test_bad_field(kwargs, must_say):
    with pytest.raises(PlanError) as info:
        Plan(**kwargs)
    for text in must_say:
        assert text in str(info.value)


def test_plan_error_is_value_error():
    assert issubclass(PlanError, ValueError)


def test_patches_default_to_pipefusion():
    assert Plan().num_patches == 1
    assert Plan(pipefusion=4).num_patches == 4
    assert Plan(pipefusion=4, patches=8).num_patches == 8


# ---- validate against the world and the model ---------------------------------------------


def test_world_size_mismatch_message_and_fix():
    with pytest.raises(PlanError) as info:
        Plan(cfg=2, ulysses=2).validate(8)
    assert str(info.value) == (
        "Plan(dp=1, cfg=2, pipefusion=1, ring=1, ulysses=2) needs 4 processes "
        "(dp*cfg*pipefusion*ring*ulysses = 1*2*1*1*2) but the world size is 8: "
        "change a degree so the product is 8, e.g. ulysses=4"
    )


def _fix(plan, world_size, **model):
    with pytest.raises(PlanError) as info:
        plan.validate(world_size, **model)
    return str(info.value).split("e.g. ")[-1]


def test_world_size_fix_suggestions_fit():
    assert _fix(Plan(cfg=2, ulysses=2), 6) == "ulysses=3"
    assert _fix(Plan(ulysses=4, cfg=2), 4) == "ulysses=2"
    # more Ulysses processes than heads would not fit: scale dp instead
    assert _fix(Plan(ulysses=4), 16, heads=4) == "dp=4"
    assert _fix(Plan(cfg=2, ulysses=2), 3) == "Plan(ulysses=3)"
    assert _fix(Plan(cfg=2), 1) == "cfg=1"
    assert "every degree to 1, i.e. Plan()" in _fix(Plan(cfg=2, ulysses=2), 1)
    # whatever is suggested, applying it gives a valid plan
    for plan, ws in [(Plan(cfg=2, ulysses=2), 8), (Plan(ring=2, ulysses=2), 6)]:
        name, value = _fix(plan, ws).split("=")
        plan.replace(**{name: int(value)}).validate(ws)


def test_validate_returns_plan():
    plan = Plan(cfg=2, ulysses=2)
    assert plan.validate(4, heads=24, num_blocks=19) is plan
    assert Plan().validate() == Plan()


def test_pipefusion_more_than_blocks():
    with pytest.raises(PlanError) as info:
        Plan(pipefusion=8).validate(8, num_blocks=4)
    message = str(info.value)
    assert "pipefusion=8" in message and "num_blocks=4" in message
    assert "at most 4" in message


def test_heads_not_divisible_by_ulysses_is_allowed():
    Plan(ulysses=4).validate(4, heads=6)


def test_ulysses_more_than_heads_suggests_ring():
    with pytest.raises(PlanError) as info:
        Plan(ulysses=32).validate(32, heads=24)
    message = str(info.value)
    assert "ulysses=32" in message and "24 heads" in message
    assert "ulysses=8, ring=4" in message
    Plan(ulysses=8, ring=4).validate(32, heads=24)


def test_ulysses_more_than_heads_with_ring_is_allowed():
    Plan(ulysses=8, ring=2).validate(16, heads=4)


def test_bad_model_sizes():
    with pytest.raises(PlanError, match="heads=0"):
        Plan().validate(heads=0)
    with pytest.raises(PlanError, match="world size"):
        Plan().validate(0)


# ---- properties and printing --------------------------------------------------------------


def test_sizes():
    plan = Plan(dp=2, cfg=2, pipefusion=2, ring=2, ulysses=3)
    assert plan.world_size == 48
    assert plan.sp == 6


def test_str_lists_non_defaults():
    assert str(Plan()) == "Plan()"
    assert str(Plan(cfg=2, ulysses=2)) == "Plan(cfg=2, ulysses=2)"
    assert str(Plan(compile="inductor", fastattn=True)) == "Plan(fastattn=True, compile='inductor')"


def test_frozen_and_hashable():
    plan = Plan(overrides=[("a.*", {"fastattn": False})])
    with pytest.raises(AttributeError):
        plan.ulysses = 2
    assert hash(plan) == hash(Plan(overrides=(("a.*", {"fastattn": False}),)))
    assert len({plan, Plan(), Plan()}) == 2


def test_replace():
    plan = Plan(cfg=2)
    assert plan.replace(ulysses=2) == Plan(cfg=2, ulysses=2)
    with pytest.raises(PlanError, match="did you mean 'ulysses'"):
        plan.replace(ulyses=2)
    with pytest.raises(PlanError, match="cfg=3"):
        plan.replace(cfg=3)


# ---- serialization ------------------------------------------------------------------------

FULL = Plan(
    dp=2,
    cfg=2,
    pipefusion=2,
    patches=4,
    warmup_steps=2,
    ring=2,
    ulysses=2,
    fastattn="/tmp/fa.json",
    compile="inductor",
    attention="flash",
    overrides=(
        ("transformer_blocks.*", {"sequence_parallel": False}),
        ("transformer_blocks.0", {"attention": "math", "fastattn": True}),
    ),
)


@pytest.mark.parametrize("plan", [Plan(), Plan(cfg=2, ulysses=2), FULL])
def test_dict_round_trip(plan):
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("plan", [Plan(), FULL])
def test_json_round_trip(plan, tmp_path):
    assert Plan.from_json(plan.to_json()) == plan
    json.loads(plan.to_json())  # plain JSON
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert Plan.parse(str(path)) == plan


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(PlanError) as info:
        Plan.from_dict({"ulysses": 2, "sequence": 4})
    message = str(info.value)
    assert "'sequence'" in message
    assert "valid fields: dp, cfg, pipefusion, patches, warmup_steps, stage_blocks, across_steps, ring, ulysses" in message


def test_from_dict_takes_defaults():
    assert Plan.from_dict({"ulysses": 2}) == Plan(ulysses=2)


def test_from_json_bad_text():
    with pytest.raises(PlanError, match="does not parse"):
        Plan.from_json("{ulysses: 2")


def test_parse_cli_string():
    assert Plan.parse("ulysses=2,ring=2") == Plan(ulysses=2, ring=2)
    assert Plan.parse(" cfg = 2 , pipefusion=2, patches=none ") == Plan(cfg=2, pipefusion=2)
    assert Plan.parse("") == Plan()
    assert Plan.parse("fastattn=true,compile=inductor") == Plan(fastattn=True, compile="inductor")
    assert Plan.parse("fastattn=plans/fa.json").fastattn == "plans/fa.json"
    assert Plan.parse("fastattn=none").fastattn is None
    with pytest.raises(PlanError, match="key=value"):
        Plan.parse("ulysses")
    with pytest.raises(PlanError, match="ulysses='two'"):
        Plan.parse("ulysses=two")
    with pytest.raises(PlanError, match="valid fields"):
        Plan.parse("sp=2")
    with pytest.raises(PlanError, match="JSON plan file"):
        Plan.parse("overrides=x")


# ---- per-module overrides ------------------------------------------------------------------


def test_override_later_entry_wins():
    plan = Plan(
        overrides=(
            ("*", {"fastattn": True, "attention": "flash"}),
            ("transformer_blocks.*", {"fastattn": False}),
            ("transformer_blocks.0", {"fastattn": True, "sequence_parallel": False}),
            ("*.norm*", {"attention": "math"}),
        )
    )
    assert plan.override_for("proj_out") == {"fastattn": True, "attention": "flash"}
    assert plan.override_for("transformer_blocks.3.attn") == {
        "fastattn": False,
        "attention": "flash",
    }
    # "transformer_blocks.0" covers the block's submodules (matched on a dotted prefix)
    assert plan.override_for("transformer_blocks.0.attn") == {
        "fastattn": True,
        "attention": "flash",
        "sequence_parallel": False,
    }
    # but not another block whose name starts the same
    assert plan.override_for("transformer_blocks.07")["fastattn"] is False
    assert plan.override_for("transformer_blocks.3.norm1")["attention"] == "math"


def test_override_order_decides_not_specificity():
    specific_first = Plan(
        overrides=(("transformer_blocks.0", {"fastattn": True}), ("*", {"fastattn": False}))
    )
    assert specific_first.override_for("transformer_blocks.0") == {"fastattn": False}


def test_override_no_match_and_mapping_form():
    plan = Plan(overrides={"single_transformer_blocks.*": {"sequence_parallel": False}})
    assert plan.overrides == (("single_transformer_blocks.*", {"sequence_parallel": False}),)
    assert plan.override_for("transformer_blocks.1") == {}
    assert plan.override_for("single_transformer_blocks.1.attn") == {"sequence_parallel": False}


def test_override_returns_a_copy():
    plan = Plan(overrides=(("*", {"fastattn": False}),))
    plan.override_for("a")["fastattn"] = True
    assert plan.override_for("a") == {"fastattn": False}

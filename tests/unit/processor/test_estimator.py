"""The built-in estimator against hand-computed cases: effluent from influent (removal, the
temperature and flow corrections), and the class on each side of every default limit with the
confidence its margins give (README "Reusability predictions").

Default limits: discharge BOD 25, COD 125, TSS 35, pH 6.0-9.0; reuse class A BOD 10, TSS 10.
A comfortable effluent (BOD 5, COD 50, TSS 5, pH 7.5) has margins 0.8, 0.6, 0.857, 1.0, 1.0
(discharge) and 0.5, 0.5 (class A); the cases change one value at a time.
"""

import dataclasses

import pytest

from gateway.processor.estimator import (
    DISCHARGE_ONLY,
    NOT_COMPLIANT,
    Effluent,
    EstimatorConfig,
    Limits,
    Removal,
    RemovalOverride,
    classify,
    effluent,
    estimate,
)

CLEAN = Effluent(bod=5.0, cod=50.0, tss=5.0, ph=7.5, tds=600.0)


def test_a_comfortable_effluent_is_class_a_with_full_confidence():
    # deciding margin 0.5 (class A's BOD and TSS) = full_confidence_margin: 0.5 + 0.5 * 1
    assert classify(CLEAN) == ("class A", 1.0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # class A's BOD 10: 9.5 inside by 0.05, 10.5 outside by 0.05 -> 0.5 + 0.5 * 0.05 / 0.5
        ({"bod": 9.5}, ("class A", 0.55)),
        ({"bod": 10.0}, ("class A", 0.5)),  # on the limit is inside, a coin toss
        ({"bod": 10.5}, (DISCHARGE_ONLY, 0.55)),
        # class A's TSS 10
        ({"tss": 9.5}, ("class A", 0.55)),
        ({"tss": 10.5}, (DISCHARGE_ONLY, 0.55)),
        # discharge BOD 25: (25 - 24) / 25 = 0.04 -> 0.54; 26 is outside by 0.04
        ({"bod": 24.0}, (DISCHARGE_ONLY, 0.54)),
        ({"bod": 25.0}, (DISCHARGE_ONLY, 0.5)),
        ({"bod": 26.0}, (NOT_COMPLIANT, 0.54)),
        # discharge COD 125 (class A has no COD limit but needs the discharge limits)
        ({"cod": 120.0}, ("class A", 0.54)),
        ({"cod": 125.0}, ("class A", 0.5)),
        ({"cod": 130.0}, (NOT_COMPLIANT, 0.54)),
        # discharge TSS 35: (35 - 34) / 35 = 0.02857 -> 0.5 + 0.02857 = 0.529
        ({"tss": 34.0}, (DISCHARGE_ONLY, 0.529)),
        ({"tss": 36.0}, (NOT_COMPLIANT, 0.529)),
        # pH 6.0-9.0, margins in units of 1.5 pH: 0.15 pH is a margin of 0.1 -> 0.6
        ({"ph": 6.15}, ("class A", 0.6)),
        ({"ph": 6.0}, ("class A", 0.5)),
        ({"ph": 5.85}, (NOT_COMPLIANT, 0.6)),
        ({"ph": 8.85}, ("class A", 0.6)),
        ({"ph": 9.0}, ("class A", 0.5)),
        ({"ph": 9.15}, (NOT_COMPLIANT, 0.6)),
        # far from every limit: full confidence either way
        ({"bod": 200.0}, (NOT_COMPLIANT, 1.0)),
    ],
    ids=lambda v: str(v),
)
def test_each_limit_just_inside_and_just_outside(change, expected):
    assert classify(dataclasses.replace(CLEAN, **change)) == expected


def test_discharge_only_is_as_sure_as_its_closest_call_either_way():
    # BOD 20: misses class A by 1.0 but is inside discharge by only 0.2 -> 0.5 + 0.5 * 0.4
    assert classify(dataclasses.replace(CLEAN, bod=20.0)) == (DISCHARGE_ONLY, 0.7)


def test_reuse_classes_are_tried_in_order_and_named_by_the_site():
    classes = {"A": Limits(bod=10.0, tss=10.0), "B": Limits(bod=20.0, tss=20.0)}
    e = dataclasses.replace(CLEAN, bod=15.0)
    # B inside by 0.25, A missed by 0.5, discharge inside by 0.4 -> 0.5 + 0.5 * 0.25 / 0.5
    assert classify(e, reuse_classes=classes) == ("class B", 0.75)
    # without reuse classes: the discharge margins decide, the closest BOD 0.4 -> 0.9
    assert classify(e, reuse_classes={}) == (DISCHARGE_ONLY, 0.9)


# --- effluent -----------------------------------------------------------------------------------

# Removal fractions with exact binary remainders: 1/4, 1/2, 1/8.
EXACT = Removal(bod=0.75, cod=0.5, tss=0.875)
INFLUENT = {
    "influent_BOD": 40.0,
    "influent_COD": 200.0,
    "influent_TSS": 80.0,
    "influent_pH": 7.2,
    "influent_TDS": 800.0,
    "temperature": 20.0,
}


def test_at_20_degrees_the_removal_fractions_apply_as_they_are():
    assert effluent(INFLUENT, EXACT) == Effluent(bod=10.0, cod=100.0, tss=10.0, ph=7.2, tds=800.0)


def test_just_inside_and_just_outside_class_a_from_the_influent():
    config = EstimatorConfig(removal=EXACT)
    on_limit = estimate(INFLUENT, config)
    assert (on_limit.prediction, on_limit.confidence) == ("class A", 0.5)
    # 40.4 * 0.25 = 10.1: outside class A by 0.01, the closest call -> 0.51
    over = estimate({**INFLUENT, "influent_BOD": 40.4}, config)
    assert (over.prediction, over.confidence) == (DISCHARGE_ONLY, 0.51)


def test_warm_water_removes_more_bod_and_cod_but_not_tss():
    # k = 1.047 ** (30 - 20) = 1.582949; 0.25 ** k = 0.111422, 0.5 ** k = 0.333799
    warm = effluent({**INFLUENT, "temperature": 30.0}, EXACT)
    assert warm.bod == pytest.approx(40 * 0.111422, rel=1e-5)
    assert warm.cod == pytest.approx(200 * 0.333799, rel=1e-5)
    assert warm.tss == 10.0
    # at 20 °C BOD 44 leaves 11.0 (discharge only); at 30 °C 4.90 (class A)
    config = EstimatorConfig(removal=EXACT)
    assert estimate({**INFLUENT, "influent_BOD": 44.0}, config).prediction == DISCHARGE_ONLY
    hot = {**INFLUENT, "influent_BOD": 44.0, "temperature": 30.0}
    assert estimate(hot, config).prediction == "class A"


def test_cold_water_removes_less_and_temperatures_are_clamped_to_5_35():
    # k = 1.047 ** -10 = 0.631732; 0.25 ** k = 0.416542
    cold = effluent({**INFLUENT, "temperature": 10.0}, EXACT)
    assert cold.bod == pytest.approx(40 * 0.416542, rel=1e-5)
    assert effluent({**INFLUENT, "temperature": 80.0}, EXACT) == effluent(
        {**INFLUENT, "temperature": 35.0}, EXACT
    )
    assert effluent({**INFLUENT, "temperature": -5.0}, EXACT) == effluent(
        {**INFLUENT, "temperature": 5.0}, EXACT
    )


def test_flow_above_design_flow_shortens_the_contact_time():
    removal = dataclasses.replace(EXACT, design_flow=100.0)
    # F = 100 / 200 = 0.5: BOD keeps 0.25 ** 0.5 = 0.5, TSS 0.125 ** 0.5 = 0.3535534
    e = effluent({**INFLUENT, "flow_rate": 200.0}, removal)
    assert e.bod == pytest.approx(20.0)
    assert e.tss == pytest.approx(80 * 0.3535534, rel=1e-7)
    # design_flow 0 (the default): flow changes nothing
    assert effluent({**INFLUENT, "flow_rate": 200.0}, EXACT).bod == 10.0


def test_the_design_defaults_give_class_a_with_the_documented_figures():
    # README: BOD 180 * 0.07 ** 1.047 ** 5 = 6.34, COD 350 * 0.15 ** 1.2586 = 32.17, TSS 9.6
    result = estimate({}, EstimatorConfig())
    assert result.effluent.to_dict() == {
        "BOD": 6.342,
        "COD": 32.171,
        "TSS": 9.6,
        "pH": 7.5,
        "TDS": 600.0,
    }
    # the deciding margin is class A's TSS: (10 - 9.6) / 10 = 0.04 -> 0.54
    assert (result.prediction, result.confidence) == ("class A", 0.54)


def test_a_plant_override_changes_only_what_it_names():
    config = EstimatorConfig(plants={"north": RemovalOverride(tss=0.95)})
    assert config.removal_for("north") == dataclasses.replace(Removal(), tss=0.95)
    assert config.removal_for("south") == Removal()
    assert estimate({}, config, "north").effluent.tss == pytest.approx(6.0)


def test_settings_that_make_no_sense_are_refused():
    with pytest.raises(ValueError, match="bod must be a fraction"):
        Removal(bod=1.0)
    with pytest.raises(ValueError, match=r"plants\.north: tss must be a fraction"):
        EstimatorConfig(plants={"north": RemovalOverride(tss=1.5)})
    with pytest.raises(ValueError, match="ph_min must be below ph_max"):
        Limits(ph_min=9.0, ph_max=6.0)
    with pytest.raises(ValueError, match="positive"):
        Limits(bod=0.0)
